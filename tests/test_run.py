"""One tracked run: the MLflow contract, reuse, resume into the same run, true end status."""

from __future__ import annotations

import mlflow
import pytest
import torch
from _store import TINY, runs_with_status

from epsstar import tracking
from epsstar.checkpoint import load_checkpoint
from epsstar.config import TrainConfig
from epsstar.run import run_training

CFG = TrainConfig(**TINY, eps=4 / 255)
PARAMS = ("dataset arch width n_train norm attack eps eps_255 steps step_size loss beta "
          "optimizer lr batch_size epochs seed init").split()
EPOCH_METRICS = ("train_adv_loss train_adv_acc test_clean_loss test_clean_acc test_adv_loss "
                 "test_adv_acc lr").split()
FINAL = ("best_epoch best_train_adv_loss best_test_adv_loss best_test_clean_loss "
         "best_test_adv_acc best_test_clean_acc train_seconds").split()


def _artifacts(client, run_id, path=""):
    out = []
    for f in client.list_artifacts(run_id, path):
        out += _artifacts(client, run_id, f.path) if f.is_dir else [f.path]
    return out


def test_run_follows_the_tracking_contract(tracking_store):
    outcome = run_training(CFG)
    client = mlflow.MlflowClient()
    run = client.get_run(outcome.run_id)
    assert run.info.status == "FINISHED"
    assert set(PARAMS) <= set(run.data.params)
    assert float(run.data.params["eps"]) == pytest.approx(4 / 255)
    assert float(run.data.params["eps_255"]) == pytest.approx(4.0)
    assert run.data.tags["epsstar.role"] == "scratch"
    assert run.data.tags["epsstar.config_hash"] == CFG.config_hash()
    for name in EPOCH_METRICS:
        steps = [m.step for m in client.get_metric_history(outcome.run_id, name)]
        assert steps == [1, 2, 3], name
    assert set(FINAL) <= set(run.data.metrics)
    assert run.data.metrics["best_train_adv_loss"] == outcome.metrics["best_train_adv_loss"]
    files = set(_artifacts(client, outcome.run_id))
    assert {"checkpoints/best.pt", "checkpoints/last.pt", "config.json", "epochs.csv"} <= files
    # the logged MLflow model is the best checkpoint
    model = mlflow.pytorch.load_model(f"runs:/{outcome.run_id}/model")
    best = load_checkpoint(tracking_store.split("///")[1].rsplit("/", 1)[0]
                           + f"/checkpoints/{outcome.run_id}/best.pt")
    x = torch.rand(5, 1, 8, 8)
    from epsstar.data import load_data
    from epsstar.train import make_model
    ref = make_model(CFG, load_data(CFG))
    ref.load_state_dict(best["model"])
    ref.eval()
    torch.testing.assert_close(model(x), ref(x))


def test_identical_finished_run_is_reused(tracking_store):
    first = run_training(CFG, log_model=False)
    again = run_training(CFG, log_model=False)
    assert again.reused and again.run_id == first.run_id
    assert again.metrics["best_train_adv_loss"] == first.metrics["best_train_adv_loss"]
    other = run_training(CFG.replace(seed=1), log_model=False)
    assert not other.reused and other.run_id != first.run_id


def test_killed_run_ends_killed_and_resumes_into_the_same_run(tracking_store, monkeypatch):
    original = tracking.RunTracker.log_metrics

    def die_at_epoch_2(self, metrics, step=0, **kw):
        original(self, metrics, step, **kw)
        if step == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(tracking.RunTracker, "log_metrics", die_at_epoch_2)
    with pytest.raises(KeyboardInterrupt):
        run_training(CFG, log_model=False)
    (killed,) = runs_with_status("KILLED")
    assert not runs_with_status("RUNNING")
    monkeypatch.setattr(tracking.RunTracker, "log_metrics", original)

    outcome = run_training(CFG, log_model=False)
    assert outcome.run_id == killed.info.run_id and outcome.resumed_from_epoch == 2
    client = mlflow.MlflowClient()
    assert client.get_run(outcome.run_id).info.status == "FINISHED"
    steps = [m.step for m in client.get_metric_history(outcome.run_id, "test_adv_loss")]
    assert sorted(steps) == [1, 2, 3]


def test_failed_run_ends_failed(tracking_store):
    with pytest.raises(FloatingPointError):
        run_training(CFG.replace(lr=1e6), log_model=False)
    assert len(runs_with_status("FAILED")) == 1
    assert not runs_with_status("RUNNING")


def test_tracking_outage_loses_no_epoch(tracking_store, monkeypatch):
    client = mlflow.MlflowClient
    original = client.log_batch
    calls = {"n": 0}

    def flaky(self, run_id, metrics=(), params=(), tags=(), **kw):
        if metrics and any(m.step == 2 for m in metrics) and calls["n"] < 3:
            calls["n"] += 1
            raise ConnectionError("tracking server down")
        return original(self, run_id, metrics=metrics, params=params, tags=tags, **kw)

    monkeypatch.setattr(client, "log_batch", flaky)
    monkeypatch.setattr(tracking.time, "sleep", lambda s: None)
    with pytest.warns(UserWarning, match="MLflow"):
        outcome = run_training(CFG, log_model=False)
    assert calls["n"] == 3
    history = mlflow.MlflowClient().get_metric_history(outcome.run_id, "train_adv_loss")
    assert sorted(m.step for m in history) == [1, 2, 3]


def test_epoch_checkpointed_but_not_logged_is_logged_on_resume(tracking_store, monkeypatch):
    """A kill between an epoch's checkpoint and its metrics must not lose that epoch."""
    original = tracking.RunTracker.log_metrics

    def die_before_logging_epoch_2(self, metrics, step=0, **kw):
        if step == 2:
            raise KeyboardInterrupt
        original(self, metrics, step, **kw)

    monkeypatch.setattr(tracking.RunTracker, "log_metrics", die_before_logging_epoch_2)
    with pytest.raises(KeyboardInterrupt):
        run_training(CFG, log_model=False)
    monkeypatch.setattr(tracking.RunTracker, "log_metrics", original)
    outcome = run_training(CFG, log_model=False)
    assert outcome.resumed_from_epoch == 2
    history = mlflow.MlflowClient().get_metric_history(outcome.run_id, "test_adv_loss")
    assert sorted(m.step for m in history) == [1, 2, 3]
