"""``epsstar train``: one clean or adversarial training run, fully tracked in MLflow."""

from __future__ import annotations

import os

import click

from epsstar.cli._options import (
    config_from_kwargs,
    end_runs_on_sigterm,
    run_options,
    train_options,
)


@click.command("train")
@train_options()
@run_options
@click.option("--reuse", type=click.BOOL, default=True, show_default=True,
              help="return an identical FINISHED run instead of training again (true|false)")
def command(experiment, checkpoint_dir, download, reuse, log_model, **kwargs) -> None:
    """Train one configuration (eps = 0: clean) and log it to MLflow.

    An identical FINISHED run is reused; an interrupted one is resumed from its last epoch.
    """
    from epsstar import tracking
    from epsstar.run import run_training

    cfg = config_from_kwargs(kwargs)
    end_runs_on_sigterm()
    experiment_id = tracking.get_or_create_experiment(experiment)
    outcome = run_training(
        cfg, experiment_id=experiment_id, run_id=os.environ.get("MLFLOW_RUN_ID"),
        reuse=reuse, checkpoint_root=checkpoint_dir, download=download,
        log_model=log_model,
    )
    m = outcome.metrics
    how = "reused identical finished run" if outcome.reused else (
        f"resumed from epoch {outcome.resumed_from_epoch}" if outcome.resumed_from_epoch
        else "trained")
    click.echo(
        f"run {outcome.run_id} ({how}): eps={cfg.eps:.6g} ({cfg.eps_255:.4g}/255) "
        f"best_epoch={m.get('best_epoch', float('nan')):.0f} "
        f"train_adv_loss={m.get('best_train_adv_loss', float('nan')):.4f} "
        f"test_clean_loss={m.get('best_test_clean_loss', float('nan')):.4f} "
        f"test_adv_loss={m.get('best_test_adv_loss', float('nan')):.4f}"
    )
