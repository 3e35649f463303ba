"""``epsstar worker``: join a running eps* search and train its trials until the search is over."""

from __future__ import annotations

import click

from epsstar.cli._options import end_runs_on_sigterm


@click.command("worker")
@click.option("--study-name", required=True, help="the search's Optuna study name")
@click.option("--storage", required=True,
              help="the search's Optuna storage URL, e.g. "
                   "postgresql+psycopg2://user@host:5432/epsstar_optuna (SQLite is refused)")
@click.option("--tracking-uri", envvar="MLFLOW_TRACKING_URI", default=None,
              help="MLflow tracking server [default: $MLFLOW_TRACKING_URI]; credentials come "
                   "from $MLFLOW_TRACKING_USERNAME / $MLFLOW_TRACKING_PASSWORD")
@click.option("--checkpoint-dir", default="checkpoints", show_default=True,
              type=click.Path(file_okay=False), help="local checkpoint root (one dir per run)")
@click.option("--log-model", type=click.BOOL, default=True, show_default=True,
              help="log each run's best weights as an MLflow model (true|false)")
@click.option("--download", type=click.BOOL, default=False, show_default=True,
              help="let torchvision download a missing dataset (true|false)")
@click.option("--device", default="",
              help="this machine's device: auto | cpu | cuda | cuda:N [default: the search's]")
@click.option("--data-dir", default="", help="this machine's dataset directory "
                                             "[default: the search's]")
@click.option("--loader-workers", type=click.IntRange(min=0), default=None,
              help="DataLoader worker processes on this machine [default: the search's]")
@click.option("--wait", "wait_s", type=click.FloatRange(min=0), default=0.0, show_default=True,
              help="seconds to wait for the study to exist (workers started together with the "
                   "`epsstar find` that creates it after its clean run)")
def command(study_name, storage, tracking_uri, checkpoint_dir, log_model, download, device,
            data_dir, loader_workers, wait_s) -> None:
    """Join an eps* search (any number of workers, on any machines) and train trials until the
    sampler stops it. Each trial is a child run of the search's parent run."""
    import mlflow

    from epsstar.lab import join_search

    if tracking_uri:
        mlflow.set_tracking_uri(tracking_uri)
    overrides = {"device": device, "data_dir": data_dir}
    overrides = {k: v for k, v in overrides.items() if v}
    if loader_workers is not None:
        overrides["loader_workers"] = loader_workers
    end_runs_on_sigterm()
    reason = join_search(study_name, storage, checkpoint_root=checkpoint_dir,
                         log_model=log_model, download=download, overrides=overrides,
                         wait_s=wait_s)
    state = f"is over ({reason})" if reason else "goes on (this worker used its trial budget)"
    click.echo(f"worker done: search {study_name} {state}")
