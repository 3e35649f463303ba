"""The ``epsstar`` command line. Each sub-command lives in its own module of this package."""

from __future__ import annotations

import click

from epsstar.cli._common import EpsstarGroup


@click.group(cls=EpsstarGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="epsstar")
def main() -> None:
    """Find the critical attack strength eps* of a training configuration."""


def _register() -> None:
    # Imported here, not at the top, so `epsstar --help` does not pay for torch / MLflow imports
    # of commands it does not run (each module imports its heavy layers inside the command).
    from epsstar.cli import estimate, find, finetune, reap, report, simulate, train, worker

    for module in (train, find, finetune, report, estimate, simulate, worker, reap):
        main.add_command(module.command)


_register()
