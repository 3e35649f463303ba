"""``epsstar reap``: end the MLflow runs that dead workers left RUNNING (marked KILLED)."""

from __future__ import annotations

import click


@click.command("reap")
@click.option("--storage", required=True, help="the search's Optuna storage URL")
@click.option("--study-name", required=True, help="the search's Optuna study name")
@click.option("--experiment", default=None,
              help="MLflow experiment name of the search [default: the one the study records]")
@click.option("--tracking-uri", envvar="MLFLOW_TRACKING_URI", default=None,
              help="MLflow tracking server [default: $MLFLOW_TRACKING_URI]")
def command(storage, study_name, experiment, tracking_uri) -> None:
    """Fail trials whose heartbeat stopped (their eps is queued again) and end every run of a
    dead trial KILLED. Safe while workers run: live trials and their runs are left alone."""
    import mlflow

    from epsstar import tracking
    from epsstar.config import ConfigError
    from epsstar.lab import reap

    if tracking_uri:
        mlflow.set_tracking_uri(tracking_uri)
    experiment_id = None
    if experiment:
        found = tracking.client().get_experiment_by_name(experiment)
        if found is None:
            raise ConfigError(f"no MLflow experiment named {experiment!r}")
        experiment_id = found.experiment_id
    report = reap(study_name, storage, experiment_id=experiment_id)
    click.echo(f"reaped {study_name}: {len(report.failed_trials)} stale trial(s) failed "
               f"{report.failed_trials}, {len(report.killed_runs)} run(s) ended KILLED "
               f"{report.killed_runs}")
