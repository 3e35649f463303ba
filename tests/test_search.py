"""`find_epsstar` end to end on a tiny digits configuration."""

from __future__ import annotations

import mlflow
import optuna
import pytest
from _store import TINY, runs_with_status
from click.testing import CliRunner

from epsstar.cli import main
from epsstar.config import ConfigError, SearchConfig, TrainConfig
from epsstar.estimate import interpolate_epsstar
from epsstar.search import default_storage, find_epsstar, open_storage

CFG = TrainConfig(**TINY)
SEARCH = SearchConfig(rtol=0.25, max_trials=4)


def _children(parent_id):
    return [r for r in runs_with_status("FINISHED")
            if r.data.tags.get("mlflow.parentRunId") == parent_id]


def test_search_logs_parent_and_children_and_rerun_trains_nothing(tracking_store):
    result = find_epsstar(CFG, SEARCH, log_model=False)
    client = mlflow.MlflowClient()
    parent = client.get_run(result.parent_run_id)
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["epsstar.role"] == "search"
    metrics = parent.data.metrics
    for name in ("threshold", "epsstar", "epsstar_255", "epsstar_lower", "epsstar_upper",
                 "n_adversarial_runs"):
        assert name in metrics, name
    assert metrics["n_adversarial_runs"] == result.n_adversarial_runs >= 1
    artifacts = {f.path for f in client.list_artifacts(result.parent_run_id, "report")}
    assert {"report/trials.csv", "report/loss_vs_eps.png", "report/summary.md"} <= artifacts

    children = _children(result.parent_run_id)
    roles = sorted(r.data.tags["epsstar.role"] for r in children)
    assert roles == ["clean"] + ["scratch"] * result.n_adversarial_runs
    assert all(r.data.tags["epsstar.study"] == result.study_name for r in children)
    clean = next(r for r in children if r.data.tags["epsstar.role"] == "clean")
    assert metrics["threshold"] == clean.data.metrics["best_test_clean_loss"]

    # the answer is the interpolation of the children's numbers (SPEC §3)
    scratch = [r for r in children if r.data.tags["epsstar.role"] == "scratch"]
    eps = [float(r.data.params["eps"]) for r in scratch]
    losses = [r.data.metrics["best_train_adv_loss"] for r in scratch]
    expected = interpolate_epsstar(eps, losses, metrics["threshold"],
                                   clean_train_loss=clean.data.metrics["best_train_adv_loss"])
    assert result.estimate.epsstar == pytest.approx(expected.epsstar)
    assert result.estimate.bound == expected.bound

    n_runs = len(runs_with_status("FINISHED"))
    again = find_epsstar(CFG, SEARCH, log_model=False)
    assert len(runs_with_status("FINISHED")) == n_runs  # nothing new trained
    assert again.parent_run_id == result.parent_run_id
    assert again.estimate.epsstar == pytest.approx(result.estimate.epsstar)
    assert not runs_with_status("RUNNING")


def test_study_with_another_threshold_is_refused(tracking_store):
    find_epsstar(CFG, SearchConfig(rtol=0.5, max_trials=1, study_name="s"), log_model=False)
    with pytest.raises(ConfigError, match="threshold"):
        find_epsstar(CFG.replace(seed=1),
                     SearchConfig(rtol=0.5, max_trials=1, study_name="s"), log_model=False)
    assert not runs_with_status("RUNNING")


def test_sqlite_storage_refuses_several_workers(tracking_store):
    with pytest.raises(ConfigError, match="SQLite"):
        open_storage(default_storage(), workers=2)
    assert isinstance(open_storage(default_storage()), optuna.storages.RDBStorage)


@pytest.mark.parametrize(
    ("args", "message"),
    [(["--eps-low", "8/255", "--eps-high", "1/255"], "eps_low"),
     (["--rtol", "0"], "rtol"),
     (["--rtol", "nan"], "rtol"),
     (["--lr", "1e6", "--epochs", "2"], "diverged")],
)
def test_find_bad_input_is_one_line(tracking_store, args, message):
    result = CliRunner().invoke(main, ["find", "--width", "16", "--epochs", "2", "--steps", "2",
                                       "--log-model", "false", *args])
    assert result.exit_code == 2, result.output
    assert message in result.stderr and "Traceback" not in result.output
    assert not runs_with_status("RUNNING")
