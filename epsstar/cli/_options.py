"""Click options for :class:`epsstar.config.TrainConfig`, generated from the dataclass so the
command line, the MLproject parameters and the config can never drift apart."""

from __future__ import annotations

import dataclasses
import signal
from collections.abc import Callable
from typing import Any

import click

from epsstar.cli._common import EPS
from epsstar.config import ATTACKS, LOSSES, NORMS, OPTIMIZERS, SCHEDULES, TrainConfig

# help text and click type for each field; every TrainConfig field must appear here
_HELP: dict[str, tuple[str, Any]] = {
    "dataset": ("digits (bundled) | mnist | cifar10 | cifar100 | svhn", str),
    "data_dir": ("directory holding torchvision datasets", click.Path(file_okay=False)),
    "n_train": ("training-set size (0 = the whole training split)", click.IntRange(min=0)),
    "val_fraction": ("early-stop on this held-out fraction of train instead of the test set",
                     click.FloatRange(0, 1, max_open=True)),
    "augment": ("crop+flip augmentation for CIFAR/SVHN (true|false)", click.BOOL),
    "arch": ("mlp | cnn | preact_resnet18 | wrn34", str),
    "width": ("hidden width h (mlp, cnn) or widen factor k (wrn34)", click.IntRange(min=1)),
    "norm": ("attack norm", click.Choice(NORMS)),
    "attack": ("training attack (evaluation always uses PGD)", click.Choice(ATTACKS)),
    "eps": ("attack radius in pixel units: 0.0078 or 2/255 (0 = clean training)", EPS),
    "steps": ("PGD steps", click.IntRange(min=1)),
    "step_size": ("PGD step in pixel units (0 = 2.5*eps/steps)", EPS),
    "loss": ("at (Madry) | trades | mart", click.Choice(LOSSES)),
    "beta": ("TRADES / MART weight", click.FloatRange(min=0)),
    "optimizer": ("optimizer", click.Choice(OPTIMIZERS)),
    "lr": ("base (peak) learning rate", click.FloatRange(min=0, min_open=True)),
    "momentum": ("SGD momentum", click.FloatRange(min=0)),
    "weight_decay": ("weight decay", click.FloatRange(min=0)),
    "schedule": ("lr schedule", click.Choice(SCHEDULES)),
    "batch_size": ("minibatch size", click.IntRange(min=1)),
    "epochs": ("training epochs", click.IntRange(min=1)),
    "seed": ("random seed", int),
    "init": ("scratch | checkpoint path | runs:/<run_id> to fine-tune from", str),
    "device": ("auto | cpu | cuda | cuda:N", str),
    "loader_workers": ("DataLoader worker processes", click.IntRange(min=0)),
}


def option_name(field: str) -> str:
    return "--" + field.replace("_", "-")


def train_options(exclude: tuple[str, ...] = ()) -> Callable:
    """Decorator adding one option per TrainConfig field (defaults from the dataclass)."""
    defaults = TrainConfig()

    def decorate(fn: Callable) -> Callable:
        for f in reversed(dataclasses.fields(TrainConfig)):
            if f.name in exclude:
                continue
            help_text, typ = _HELP[f.name]
            fn = click.option(option_name(f.name), f.name, type=typ,
                              default=getattr(defaults, f.name), show_default=True,
                              help=help_text)(fn)
        return fn

    return decorate


def run_options(fn: Callable) -> Callable:
    """The options every command that trains shares: where runs and checkpoints go."""
    options = [
        click.option("--experiment", default=None,
                     help="MLflow experiment name [default: $MLFLOW_EXPERIMENT_NAME or "
                          "'epsstar']"),
        click.option("--checkpoint-dir", default="checkpoints", show_default=True,
                     type=click.Path(file_okay=False),
                     help="local checkpoint root (one dir per run)"),
        click.option("--download", type=click.BOOL, default=False, show_default=True,
                     help="let torchvision download a missing dataset (true|false)"),
        click.option("--log-model", type=click.BOOL, default=True, show_default=True,
                     help="log each run's best weights as an MLflow model (true|false)"),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def config_from_kwargs(kwargs: dict[str, Any], **overrides: Any) -> TrainConfig:
    """Pop the TrainConfig fields out of a click kwargs dict and build the config."""
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    values = {k: kwargs.pop(k) for k in list(kwargs) if k in names}
    return TrainConfig(**{**values, **overrides})


def end_runs_on_sigterm() -> None:
    """SIGTERM (a scheduler, `kill`) ends the current run KILLED, like Ctrl-C does."""

    def handler(signum, frame):  # noqa: ARG001 - signal API
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, handler)
