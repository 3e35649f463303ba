"""A throw-away MLflow tracking store per test: sqlite in tmp_path, cwd moved there too (so the
default checkpoint and Optuna files land in tmp_path, not in the repository)."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import mlflow
import pytest

TINY = dict(dataset="digits", arch="mlp", width=16, epochs=3, steps=3, batch_size=256, lr=0.1,
            device="cpu")


@pytest.fixture(scope="session")
def _empty_store(tmp_path_factory):
    """MLflow's schema migrations take seconds: run them once, copy the file per test."""
    path = tmp_path_factory.mktemp("mlflow-template") / "mlflow.db"
    mlflow.MlflowClient(f"sqlite:///{path}").search_experiments()
    return path


@contextmanager
def store_in(directory: Path, template: Path, mp: pytest.MonkeyPatch) -> Iterator[str]:
    """Point MLflow (env and process) at a copy of the empty store in ``directory``; cwd too."""
    shutil.copy(template, directory / "mlflow.db")
    uri = f"sqlite:///{directory}/mlflow.db"
    mp.setenv("MLFLOW_TRACKING_URI", uri)
    for var in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME"):
        mp.delenv(var, raising=False)
    mp.chdir(directory)
    mlflow.set_tracking_uri(uri)
    try:
        yield uri
    finally:
        mlflow.set_tracking_uri(None)


@pytest.fixture
def tracking_store(tmp_path, monkeypatch, _empty_store):
    with store_in(tmp_path, _empty_store, monkeypatch) as uri:
        yield uri


def runs_with_status(status: str) -> list:
    client = mlflow.MlflowClient()
    exps = [e.experiment_id for e in client.search_experiments()]
    return [r for r in client.search_runs(exps, max_results=1000) if r.info.status == status]
