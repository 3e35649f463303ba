"""``epsstar find``: the main job — ε* of a configuration, with its bracket and a report."""

from __future__ import annotations

import click

from epsstar.cli._common import EPS
from epsstar.cli._options import (
    config_from_kwargs,
    end_runs_on_sigterm,
    run_options,
    train_options,
)
from epsstar.config import SearchConfig

_SEARCH = SearchConfig()


@click.command("find")
@train_options(exclude=("eps",))
@click.option("--eps-low", type=EPS, default=_SEARCH.eps_low, show_default=True,
              help="smallest eps to try, pixel units (0.1/255 written as 0.1/255 is fine)")
@click.option("--eps-high", type=EPS, default=_SEARCH.eps_high, show_default=True,
              help="largest eps to try, pixel units")
@click.option("--rtol", type=float, default=_SEARCH.rtol, show_default=True,
              help="stop when the bracket's relative width (upper-lower)/upper is this small")
@click.option("--max-trials", type=click.IntRange(min=1), default=_SEARCH.max_trials,
              show_default=True, help="budget of adversarial runs")
@click.option("--study-name", default="", help="Optuna study name [default: from the config]")
@click.option("--storage", default="",
              help="Optuna storage URL [default: sqlite optuna.db next to the MLflow store]")
@click.option("--clean-guess", type=click.BOOL, default=True, show_default=True,
              help="attack the clean model first for a free lower guess of eps* (true|false)")
@click.option("--workers", type=click.IntRange(min=1), default=1, show_default=True,
              help="local worker processes sharing the study")
@run_options
def command(eps_low, eps_high, rtol, max_trials, study_name, storage, clean_guess, workers,
            experiment, checkpoint_dir, download, log_model, **kwargs) -> None:
    """Find eps*: a clean run, then an Optuna bisection over eps, every run logged to MLflow."""
    from epsstar import tracking
    from epsstar.search import describe, find_epsstar

    cfg = config_from_kwargs(kwargs)
    search = SearchConfig(eps_low=eps_low, eps_high=eps_high, rtol=rtol, max_trials=max_trials,
                          study_name=study_name, storage=storage, clean_guess=clean_guess,
                          workers=workers)
    end_runs_on_sigterm()
    experiment_id = tracking.get_or_create_experiment(experiment)
    result = find_epsstar(cfg, search, experiment_id=experiment_id,
                          checkpoint_root=checkpoint_dir, log_model=log_model, download=download)
    click.echo(f"{cfg.dataset}/{cfg.arch}/{cfg.norm}: R*(0) = {result.threshold:.4f}; "
               f"{describe(result.estimate)}; {result.n_adversarial_runs} adversarial runs "
               f"(search run {result.parent_run_id})")
