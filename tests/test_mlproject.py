"""MLproject and the click commands must agree: every parameter reaches its command line and
lands on a real option (an MLproject parameter that is silently dropped is a classic bug)."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import click
import pytest
import yaml

from epsstar.cli import main

ROOT = Path(__file__).resolve().parents[1]
PROJECT = yaml.safe_load((ROOT / "MLproject").read_text())
ENTRY_POINTS = PROJECT["entry_points"]


def _subcommand(command: str) -> click.Command:
    script = re.search(r"python (entrypoints/\w+\.py)", command).group(1)
    name = re.search(r'main\(\["(\w+)"', (ROOT / script).read_text()).group(1)
    return main.commands[name]


@pytest.mark.parametrize("entry", sorted(ENTRY_POINTS))
def test_every_parameter_reaches_an_option(entry):
    spec = ENTRY_POINTS[entry]
    command = " ".join(spec["command"].split())
    cli = _subcommand(command)
    options = {opt for p in cli.params for opt in p.opts}
    used = set(re.findall(r"\{(\w+)\}", command))
    declared = set(spec.get("parameters", {}))
    assert used == declared, f"unused: {declared - used}; undeclared: {used - declared}"
    for name in declared:
        flag = re.search(r"(--[\w-]+) \{" + name + r"\}", command)
        assert flag, f"{entry}: {{{name}}} is not the value of an option"
        assert flag.group(1) in options, f"{entry}: {flag.group(1)} is not an option of {cli.name}"


@pytest.mark.parametrize("entry", sorted(ENTRY_POINTS))
def test_defaults_parse(entry):
    """The declared defaults are values the click options accept."""
    spec = ENTRY_POINTS[entry]
    command = " ".join(spec["command"].split())
    cli = _subcommand(command)
    args = re.sub(r"python entrypoints/\w+\.py", "", command)
    for name, param in spec.get("parameters", {}).items():
        default = param.get("default")
        args = args.replace("{" + name + "}", shlex.quote(str(default)))  # as MLflow does
    ctx = cli.make_context(cli.name, shlex.split(args))
    assert ctx.params  # parsing succeeded with every default


def test_conda_env_lists_setup_dependencies():
    conda = (ROOT / PROJECT["conda_env"]).read_text()
    setup = (ROOT / "setup.cfg").read_text()
    block = setup.split("install_requires =")[1].split("\n\n")[0]
    for requirement in block.split():
        name = re.split(r"[<>=]", requirement)[0]
        assert name in conda, f"{name} is in setup.cfg but not in conda.yaml"
