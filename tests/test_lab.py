"""A lab: many workers on one search, a shared PostgreSQL-backed tracking server with basic-auth,
and nothing lost when a worker (or the server) goes away. Against the real services of
lab_helpers.py; the tests marked ``lab`` fail when PostgreSQL is unreachable."""

from __future__ import annotations

import dataclasses
import math
import os
import signal
import subprocess
import sys
import threading
import time
import uuid

import mlflow
import optuna
import pytest
import torch
from click.testing import CliRunner
from lab_helpers import GRACE_S, TINY, lab  # noqa: F401 - the fixture

from epsstar import tracking
from epsstar.checkpoint import CheckpointError, load_checkpoint
from epsstar.cli import main
from epsstar.config import ConfigError, SearchConfig, TrainConfig
from epsstar.lab import join_search
from epsstar.run import load_init_weights, run_training
from epsstar.sampler import BisectionSampler
from epsstar.search import (
    find_epsstar,
    finish_search,
    load_search_study,
    open_storage,
    run_trials,
    start_search,
)

CFG = TrainConfig(**TINY)
SEARCH = SearchConfig(rtol=0.25, max_trials=5)
COMPLETE, FAIL = optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.FAIL


def _unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def _runs(experiment_id: str, where: str = "") -> list:
    return mlflow.MlflowClient().search_runs([experiment_id], filter_string=where,
                                             max_results=1000)


def _points(study: optuna.Study) -> list[tuple[float, float]]:
    """(ε, loss) of the completed trials, in the order they were trained."""
    return [(t.params["eps"], t.value) for t in study.get_trials(states=(COMPLETE,))]


def _wait_until(what: str, condition, timeout: float = 180.0, every: float = 0.1):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out waiting for {what}")


# --------------------------------------------------------------------------- storages
def test_sqlite_is_refused_for_several_workers_before_anything_trains(tmp_path):
    sqlite = f"sqlite:///{tmp_path}/optuna.db"
    with pytest.raises(ConfigError, match="SQLite"):
        open_storage(sqlite, workers=2)
    # find_epsstar refuses before its clean run: no tracking store is even contacted
    with pytest.raises(ConfigError, match="SQLite"):
        find_epsstar(CFG, SearchConfig(storage=sqlite, workers=2), experiment_id="0")
    result = CliRunner().invoke(main, ["worker", "--study-name", "s", "--storage", sqlite])
    assert result.exit_code == 2 and "SQLite" in result.output
    journal = open_storage(f"journal:///{tmp_path}/optuna.journal", workers=4)
    assert isinstance(journal, optuna.storages.JournalStorage)


# --------------------------------------------------------------------------- (a)
@pytest.mark.lab
def test_three_workers_find_epsstar_together(lab, tmp_path, monkeypatch):  # noqa: F811
    monkeypatch.chdir(tmp_path)
    experiment_id = tracking.get_or_create_experiment(_unique("three-workers"))
    search = dataclasses.replace(SEARCH, study_name=_unique("three"), storage=lab.optuna_url,
                                 workers=3)
    result = find_epsstar(CFG, search, experiment_id=experiment_id,
                          checkpoint_root=tmp_path / "checkpoints", log_model=False)

    assert result.estimate.bound is None and math.isfinite(result.estimate.epsstar)
    study = optuna.load_study(study_name=search.study_name, storage=lab.optuna_url)
    trained = _runs(experiment_id, "tags.`epsstar.role` = 'scratch'")
    eps = [float(r.data.params["eps"]) for r in trained]
    assert len(eps) == len(set(eps)) >= 3  # no eps trained twice
    assert {r.info.run_id for r in trained} == {
        t.user_attrs["run_id"] for t in study.get_trials(states=(COMPLETE,))}
    for run in _runs(experiment_id, f"tags.`epsstar.study` = '{search.study_name}'"):
        assert run.info.status == "FINISHED", run.info.run_name
        if run.info.run_id != result.parent_run_id:
            assert run.data.tags[tracking.TAG_PARENT] == result.parent_run_id
    # the workers trained at the same time: some runs overlap in time
    spans = sorted((r.info.start_time, r.info.end_time) for r in trained)
    assert any(later[0] < earlier[1] for earlier, later in zip(spans, spans[1:], strict=False))


# --------------------------------------------------------------------------- (b)
def _checkpointed_run(study: optuna.Study) -> str:
    """The run id of trial 0 once its first epoch's checkpoint is in the artifact store."""
    trials = study.get_trials(deepcopy=False)
    run_id = trials[0].user_attrs.get("run_id") if trials else None
    if run_id is None:
        return ""
    files = {f.path for f in mlflow.MlflowClient().list_artifacts(run_id, "checkpoints")}
    return run_id if "checkpoints/last.pt" in files else ""


@pytest.mark.lab
def test_killed_worker_trial_is_retried_from_its_checkpoint(lab, tmp_path, monkeypatch):  # noqa: F811
    monkeypatch.chdir(tmp_path)
    client = lab.client()
    search = dataclasses.replace(SEARCH, max_trials=3, storage=lab.optuna_url)
    reference = find_epsstar(
        CFG, dataclasses.replace(search, study_name=_unique("uninterrupted")),
        experiment_id=tracking.get_or_create_experiment(_unique("uninterrupted")),
        checkpoint_root=tmp_path / "reference", log_model=False)
    ref_study = optuna.load_study(study_name=reference.study_name, storage=lab.optuna_url)

    experiment_id = tracking.get_or_create_experiment(_unique("killed"))
    session = start_search(CFG, dataclasses.replace(search, study_name=_unique("killed")),
                           experiment_id=experiment_id, checkpoint_root=tmp_path / "driver",
                           log_model=False)
    # machine A uploads its checkpoint after every epoch (EPSSTAR_UPLOAD_EVERY_S=0)
    worker_a = lab.spawn_worker(session.study_name, tmp_path / "machine-a",
                                env={"EPSSTAR_UPLOAD_EVERY_S": "0"})
    dead_run = _wait_until("a checkpoint of trial 0 in the artifact store",
                           lambda: _checkpointed_run(session.study))
    worker_a.send_signal(signal.SIGKILL)
    worker_a.wait()
    assert client.get_run(dead_run).info.status == "RUNNING"  # what a dead worker leaves
    time.sleep(GRACE_S + 1)  # trial 0's heartbeat is now stale

    # machine B (this process) shares nothing with machine A but the two stores
    assert join_search(session.study_name, lab.optuna_url, log_model=False,
                       checkpoint_root=tmp_path / "machine-b") is not None
    result = finish_search(session)
    reaped = CliRunner().invoke(main, ["reap", "--storage", lab.optuna_url,
                                       "--study-name", session.study_name])
    assert reaped.exit_code == 0, reaped.output

    assert not _runs(experiment_id, "attributes.status = 'RUNNING'")
    assert client.get_run(dead_run).info.status == "KILLED"
    study = load_search_study(session.study_name, lab.optuna_url)
    assert study.trials[0].state == FAIL
    retry = [t for t in study.trials if t.system_attrs.get("failed_trial") == 0]
    assert len(retry) == 1 and retry[0].state == COMPLETE
    assert retry[0].params["eps"] == study.trials[0].params["eps"]
    # resumed, not restarted: the retry's first epochs are the dead run's, wall-clock included
    retry_run = retry[0].user_attrs["run_id"]
    assert client.get_run(retry_run).data.tags[tracking.TAG_RESUMED_FROM] == dead_run
    dead_state = load_checkpoint(tracking.download_artifact(dead_run, "checkpoints/last.pt",
                                                            tmp_path / "dead"))
    retry_state = load_checkpoint(tmp_path / "machine-b" / retry_run / "last.pt")
    done = dead_state["epoch"]
    assert 1 <= done < CFG.epochs
    assert retry_state["history"][:done] == dead_state["history"]
    steps = [m.step for m in client.get_metric_history(retry_run, "train_adv_loss")]
    assert sorted(steps) == list(range(1, CFG.epochs + 1))
    # same config, same seeds: the same losses at the same eps, so the same eps*
    assert _points(study) == _points(ref_study)
    assert result.estimate == reference.estimate


@pytest.mark.lab
def test_interrupted_worker_hands_its_trial_over(lab, tmp_path, monkeypatch):  # noqa: F811
    """Ctrl-C / SIGTERM (end_runs_on_sigterm turns it into the same KeyboardInterrupt): the run
    ends KILLED with its checkpoint uploaded (default upload interval: 5 min) and the trial is
    queued again at once, for any worker to resume."""
    monkeypatch.chdir(tmp_path)
    cfg = CFG.replace(epochs=12)  # long enough to be interrupted mid-run
    session = start_search(cfg, dataclasses.replace(SEARCH, study_name=_unique("interrupted"),
                                                    storage=lab.optuna_url),
                           experiment_id=tracking.get_or_create_experiment(_unique("int")),
                           checkpoint_root=tmp_path, log_model=False)
    client = lab.client()

    def interrupt_after_first_epoch() -> None:
        run_id = _wait_until("trial 0's run", lambda: session.study.get_trials(
            deepcopy=False)[0].user_attrs.get("run_id") if session.study.trials else None)
        _wait_until("an epoch", lambda: client.get_metric_history(run_id, "train_adv_loss"))
        os.kill(os.getpid(), signal.SIGINT)

    threading.Thread(target=interrupt_after_first_epoch, daemon=True).start()
    with pytest.raises(KeyboardInterrupt):
        run_trials(session.study, session.cfg, experiment_id=session.experiment_id,
                   parent_run_id=session.parent.run_id, checkpoint_root=tmp_path,
                   log_model=False)
    session.parent.end("KILLED")

    trials = session.study.get_trials()
    dead_run = trials[0].user_attrs["run_id"]
    assert client.get_run(dead_run).info.status == "KILLED"
    uploaded = {f.path for f in client.list_artifacts(dead_run, "checkpoints")}
    assert "checkpoints/last.pt" in uploaded
    assert trials[0].state == FAIL
    assert [(t.state, t.system_attrs["failed_trial"], t.params["eps"]) for t in trials[1:]] == [
        (optuna.trial.TrialState.WAITING, 0, trials[0].params["eps"])]


# --------------------------------------------------------------------------- reap
@pytest.mark.lab
@pytest.mark.filterwarnings("ignore:Heartbeat of storage")  # ask() stands in for optimize()
def test_reap_ends_the_runs_of_dead_trials_only(lab):  # noqa: F811
    experiment_id = tracking.get_or_create_experiment(_unique("reap"))
    name = _unique("reap")
    storage = open_storage(lab.optuna_url)
    sampler = BisectionSampler(threshold=0.5, eps_low=0.1 / 255, eps_high=64 / 255)
    study = optuna.create_study(study_name=name, storage=storage, sampler=sampler)
    sampler.check_study(study)
    for key, value in {"parent_run_id": "none", "experiment_id": experiment_id,
                       "train_config": dataclasses.asdict(CFG)}.items():
        study.set_user_attr(key, value)

    runs = {}
    for role in ("stale", "live", "failed"):
        trial = study.ask()
        storage.record_heartbeat(trial._trial_id)
        tracker = tracking.RunTracker.create(CFG, experiment_id=experiment_id, tags={
            tracking.TAG_STUDY: name, tracking.TAG_TRIAL: str(trial.number)})
        trial.set_user_attr("run_id", tracker.run_id)
        runs[role] = (trial, tracker.run_id)
    study.tell(runs["failed"][0], state=FAIL)  # crashed after its run started
    deadline = time.monotonic() + GRACE_S + 1.5
    while time.monotonic() < deadline:  # the live trial's worker keeps beating
        storage.record_heartbeat(runs["live"][0]._trial_id)
        time.sleep(0.5)

    result = CliRunner().invoke(main, ["reap", "--storage", lab.optuna_url, "--study-name", name,
                                       "--experiment", mlflow.MlflowClient().get_experiment(
                                           experiment_id).name])
    assert result.exit_code == 0, result.output
    status = {role: lab.client().get_run(run_id).info.status
              for role, (_, run_id) in runs.items()}
    assert status == {"stale": "KILLED", "live": "RUNNING", "failed": "KILLED"}
    trials = study.get_trials()
    assert trials[runs["stale"][0].number].state == FAIL
    retried = [t for t in trials if t.system_attrs.get("failed_trial")
               == runs["stale"][0].number]
    assert [t.state for t in retried] == [optuna.trial.TrialState.WAITING]
    tracking.RunTracker(runs["live"][1]).end("FINISHED")


# --------------------------------------------------------------------------- (c)
@pytest.mark.lab
def test_training_survives_a_tracking_server_restart(lab, tmp_path, monkeypatch):  # noqa: F811
    # MLflow's own HTTP retries would only wait the outage out; fail fast, so that what keeps
    # the epochs is RunTracker's buffer and retries
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    cfg = CFG.replace(eps=4 / 255, epochs=40)
    experiment_id = tracking.get_or_create_experiment(_unique("outage"))
    started: list[str] = []
    outcome: list = []
    trainer = threading.Thread(target=lambda: outcome.append(run_training(
        cfg, experiment_id=experiment_id, checkpoint_root=tmp_path, log_model=False,
        on_start=started.append)))
    trainer.start()
    client = lab.client()
    _wait_until("two epochs logged", lambda: started and len(
        client.get_metric_history(started[0], "train_adv_loss")) >= 2)

    stopped = time.time() * 1000
    lab.server.stop()
    time.sleep(10)
    lab.server.start()
    restarted = time.time() * 1000
    trainer.join(timeout=300)

    assert outcome and outcome[0].run_id == started[0]
    run = client.get_run(started[0])
    assert run.info.status == "FINISHED"
    for name in ("train_adv_loss", "train_adv_acc", "train_objective", "test_clean_loss",
                 "test_clean_acc", "test_adv_loss", "test_adv_acc", "lr"):
        history = client.get_metric_history(run.info.run_id, name)
        assert {m.step for m in history} == set(range(1, cfg.epochs + 1)), name
    # epochs trained while the server was down were delivered after it came back
    assert any(stopped < m.timestamp < restarted for m in history)
    assert run.data.metrics["best_train_adv_loss"] == outcome[0].metrics["best_train_adv_loss"]


# --------------------------------------------------------------------------- (d)
@pytest.mark.lab
def test_user_without_permission_cannot_log(lab, monkeypatch):  # noqa: F811
    from mlflow.server import get_app_client

    admin = get_app_client("basic-auth", tracking_uri=lab.tracking_uri)
    user, password = _unique("alice"), f"alice-{uuid.uuid4().hex}"
    admin.create_user(user, password)
    experiment_id = tracking.get_or_create_experiment(_unique("private"))

    with monkeypatch.context() as as_user:
        as_user.setenv("MLFLOW_TRACKING_USERNAME", user)
        as_user.setenv("MLFLOW_TRACKING_PASSWORD", password)
        start = time.monotonic()
        with pytest.raises(tracking.TrackingError, match="refused"):
            tracking.RunTracker.create(CFG, experiment_id=experiment_id)
        assert time.monotonic() - start < 10  # refused at once, not after the retry back-off
        assert not _runs(experiment_id)  # she may read the experiment: it is empty

    admin.grant_user_permission(user, "experiment", experiment_id, "EDIT")
    with monkeypatch.context() as as_user:
        as_user.setenv("MLFLOW_TRACKING_USERNAME", user)
        as_user.setenv("MLFLOW_TRACKING_PASSWORD", password)
        tracker = tracking.RunTracker.create(CFG, experiment_id=experiment_id)
        tracker.end("FINISHED")
    assert [r.info.run_id for r in _runs(experiment_id)] == [tracker.run_id]


class _Payload:
    """Unpickling this creates a file: what a malicious "checkpoint" would do, harmlessly."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.mark.lab
def test_malicious_checkpoint_in_the_artifact_store_is_refused(lab, tmp_path):  # noqa: F811
    marker = tmp_path / "code-ran"
    upload = tmp_path / "upload"
    upload.mkdir()
    for name in ("best.pt", "last.pt"):
        torch.save({"format": 1, "epoch": 1, "model": _Payload(str(marker)), "history": []},
                   upload / name)
    torch.load(upload / "last.pt", weights_only=False)  # the payload is real: unpickling runs it
    assert marker.exists()
    marker.unlink()

    experiment_id = tracking.get_or_create_experiment(_unique("poisoned"))
    poisoned = tracking.RunTracker.create(CFG, experiment_id=experiment_id)
    for name in ("best.pt", "last.pt"):
        poisoned.log_artifact(upload / name, "checkpoints")
    poisoned.end("KILLED")

    with pytest.raises(CheckpointError, match="cannot load"):  # fine-tuning from it
        load_init_weights(f"runs:/{poisoned.run_id}")
    # a retried trial that would adopt the "dead" run's checkpoint trains from epoch 1 instead
    with pytest.warns(UserWarning, match="not resuming"):
        outcome = run_training(CFG.replace(eps=2 / 255), experiment_id=experiment_id,
                               resume_from_run=poisoned.run_id,
                               checkpoint_root=tmp_path / "ckpt", log_model=False)
    assert not marker.exists()
    assert outcome.resumed_from_epoch == 0
    retry = lab.client().get_run(outcome.run_id)
    assert retry.info.status == "FINISHED"
    assert tracking.TAG_RESUMED_FROM not in retry.data.tags


# --------------------------------------------------------------------------- (3)
@pytest.mark.lab
def test_two_processes_create_the_same_experiment(lab, tmp_path):  # noqa: F811
    name = _unique("race")
    go = tmp_path / "go"
    code = ("import pathlib, sys, time\n"
            "from epsstar.tracking import get_or_create_experiment\n"
            "pathlib.Path(sys.argv[3]).touch()\n"
            "while not pathlib.Path(sys.argv[2]).exists(): time.sleep(0.001)\n"
            "print(get_or_create_experiment(sys.argv[1]))\n")
    procs = [subprocess.Popen([sys.executable, "-c", code, name, str(go), str(tmp_path / str(i))],
                              stdout=subprocess.PIPE, text=True) for i in range(2)]
    _wait_until("both processes ready", lambda: all((tmp_path / str(i)).exists()
                                                    for i in range(2)), timeout=120)
    go.touch()  # both create at the same instant
    outputs = [p.communicate(timeout=120)[0].strip() for p in procs]
    assert [p.returncode for p in procs] == [0, 0]
    assert outputs[0] == outputs[1] == lab.client().get_experiment_by_name(name).experiment_id


@pytest.mark.lab
def test_credentials_never_reach_the_stores(lab, tmp_path):  # noqa: F811
    outcome = run_training(CFG.replace(eps=1 / 255), checkpoint_root=tmp_path,
                           experiment_id=tracking.get_or_create_experiment(_unique("secret")))
    # the scanners do find what is there (a run id is in the store and in config.json's dir)
    assert lab.rows_containing(outcome.run_id) and lab.files_containing(CFG.dataset)
    assert os.environ["MLFLOW_TRACKING_PASSWORD"] == lab.password
    assert lab.rows_containing(lab.password) == []
    assert lab.files_containing(lab.password) == []
