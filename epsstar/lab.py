"""A search shared by many workers on many machines, and cleaning up after the ones that die.

The Optuna study is the only coordination: :func:`epsstar.search.start_search` records in it the
parent run id, the experiment id and the full TrainConfig, so :func:`join_search` rebuilds the
whole search from a study name and a storage URL. Every worker trains the ε the sampler gives
it (the sampler never hands out an ε that another worker holds) and stops when the sampler
stops the search.

When a worker dies:

- killed outright (SIGKILL, power, preemption without notice): its trial's heartbeat stops; the
  next worker that starts a trial, or ``epsstar reap``, fails it after the grace period,
  ends its MLflow run KILLED and queues its ε again; the retry resumes from the dead run's last
  checkpoint, local or uploaded (EPSSTAR_UPLOAD_EVERY_S).
- SIGTERM / Ctrl-C: the run uploads its checkpoint, ends KILLED, and the trial is queued again
  at once.
- :func:`reap` ends the runs left RUNNING whose trial is dead (e.g. when no worker is left to
  notice), so no run stays RUNNING forever.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import mlflow
import optuna
from optuna.trial import TrialState

from epsstar import tracking
from epsstar.config import ConfigError, EpsstarError, TrainConfig
from epsstar.search import SearchSession, check_storage, load_search_study, run_trials

log = logging.getLogger(__name__)

# How long a stopped worker gets to upload its checkpoint and end its run before SIGKILL.
STOP_GRACE_S = 60.0
# How often a worker looks for a study that does not exist yet (see join_search's wait_s).
_POLL_S = 5.0

# Per-machine settings a worker may override: not part of what a run computes (config_hash).
MACHINE_FIELDS = ("device", "data_dir", "loader_workers")


# --------------------------------------------------------------------------- one worker
def join_search(
    study_name: str,
    storage: str,
    *,
    checkpoint_root: str | Path = "checkpoints",
    log_model: bool = True,
    download: bool = False,
    overrides: dict[str, object] | None = None,
    wait_s: float = 0.0,
) -> str | None:
    """Run trials of an existing search until its sampler stops it; return the stop reason.

    Args:
        study_name, storage: the study and its Optuna storage URL (PostgreSQL for workers on
            several machines; SQLite is refused, see :func:`epsstar.search.check_storage`).
        checkpoint_root: this machine's checkpoint directory (one sub-directory per run).
        overrides: per-machine TrainConfig fields (:data:`MACHINE_FIELDS`: device, data_dir,
            loader_workers); the rest comes from the study, so every worker trains the same
            thing.
        wait_s: wait up to this long for the study to appear (workers started together with
            the ``epsstar find`` that creates it, which trains the clean run first).

    Returns:
        Why the search is over (``"converged"``, ``"max_trials"``, ...), or None when this
        worker stopped after its own ``max_trials`` trials with the search still open.
    """
    bad = set(overrides or {}) - set(MACHINE_FIELDS)
    if bad:
        raise ConfigError(f"a worker may only override {', '.join(MACHINE_FIELDS)}, "
                          f"not {', '.join(sorted(bad))}")
    check_storage(storage, workers=2)  # a worker is one of several, whatever --wait says
    study = _wait_for_study(study_name, storage, wait_s)
    attrs = study.user_attrs
    cfg = TrainConfig.from_params(attrs["train_config"]).replace(**(overrides or {}))
    _tag_mlflow_run_job(study_name)
    run_trials(study, cfg, experiment_id=attrs["experiment_id"],
               parent_run_id=attrs["parent_run_id"], checkpoint_root=checkpoint_root,
               log_model=log_model, download=download, n_trials=attrs.get("max_trials"))
    return study.sampler.stop_reason(study)


def _wait_for_study(study_name: str, storage: str, wait_s: float) -> optuna.Study:
    deadline = time.monotonic() + wait_s
    while True:
        try:
            return load_search_study(study_name, storage, workers=2)
        except ConfigError:  # no such study yet, or its attributes not written yet
            if time.monotonic() >= deadline:
                raise
        time.sleep(min(_POLL_S, max(0.0, deadline - time.monotonic())))


def _tag_mlflow_run_job(study_name: str) -> None:
    """Under ``mlflow run -e worker`` the job's own run is tagged as a worker of the study."""
    run_id = os.environ.get("MLFLOW_RUN_ID")
    if run_id:
        tracking.RunTracker(run_id).set_tags({tracking.TAG_ROLE: "worker",
                                              tracking.TAG_STUDY: study_name})


# --------------------------------------------------------------------------- local workers
def worker_command(study_name: str, storage: str, *, checkpoint_root: str | Path,
                   log_model: bool, download: bool) -> list[str]:
    """The ``epsstar worker`` command line that joins this search (run by this Python)."""
    return [sys.executable, "-m", "epsstar", "worker", "--study-name", study_name,
            "--storage", storage, "--checkpoint-dir", str(checkpoint_root),
            "--log-model", str(log_model).lower(), "--download", str(download).lower()]


def run_local_workers(session: SearchSession, n: int, *, checkpoint_root: str | Path,
                      log_model: bool, download: bool) -> list[int]:
    """Start ``n`` worker processes on this machine, wait for them, return their exit codes.

    Each worker gets its own session (a terminal's Ctrl-C reaches only this driver, which
    forwards one SIGTERM to each worker, so their runs end KILLED with checkpoints uploaded).

    Raises:
        EpsstarError: when every worker failed (the study is left for a rerun to continue).
    """
    cmd = worker_command(session.study_name, session.storage, checkpoint_root=checkpoint_root,
                         log_model=log_model, download=download)
    env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow.get_tracking_uri()}
    env.pop("MLFLOW_RUN_ID", None)  # the `mlflow run` job's run is the parent, not a worker's
    procs = [subprocess.Popen(cmd, env=env, start_new_session=True) for _ in range(n)]
    try:
        codes = [p.wait() for p in procs]
    except BaseException:
        stop_workers(procs)
        raise
    if all(code != 0 for code in codes):
        raise EpsstarError(f"all {n} workers failed (exit codes {codes}); rerun the same command "
                           "to continue the search")
    for code in codes:
        if code != 0:
            log.warning("a worker exited with status %d; the others finished the search", code)
    return codes


def stop_workers(procs: list[subprocess.Popen], grace_s: float = STOP_GRACE_S) -> None:
    """SIGTERM each live worker, give them ``grace_s`` to end their runs, then SIGKILL."""
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    for p in procs:
        try:
            p.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


# --------------------------------------------------------------------------- reaping
@dataclass(frozen=True)
class ReapReport:
    """What :func:`reap` did."""

    failed_trials: list[int]  # stale RUNNING trials it failed (their ε queued again if needed)
    killed_runs: list[str]  # MLflow runs of dead trials ended KILLED


def reap(study_name: str, storage: str, *, experiment_id: str | None = None) -> ReapReport:
    """End the MLflow runs left RUNNING whose trial is dead, marking them KILLED.

    A trial is dead when it FAILED or finished while its run still says RUNNING, or when it
    is RUNNING without a heartbeat for the grace period (it is failed here first, and its ε
    queued again unless the search is over). With a journal storage (no heartbeats) a RUNNING
    trial counts as alive. The clean run and the parent run (no trial) are left alone.

    Args:
        experiment_id: where the study's runs are; default: the study's ``experiment_id``.
    """
    study = load_search_study(study_name, storage)
    experiment_id = experiment_id or study.user_attrs["experiment_id"]
    running = tracking.client().search_runs(
        [experiment_id], max_results=10_000,
        filter_string=f"tags.`{tracking.TAG_STUDY}` = '{study_name}' and "
                      "attributes.status = 'RUNNING'")
    running_trials = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)  # ends their runs through retry_dead_trial
    trials = study.get_trials(deepcopy=False)
    killed = []
    for run in running:
        number = run.data.tags.get(tracking.TAG_TRIAL)
        if number is None or int(number) >= len(trials):
            continue
        if trials[int(number)].state == TrialState.RUNNING:
            continue
        tracking.end_if_running(run.info.run_id, "KILLED")
        killed.append(run.info.run_id)
    failed = [t.number for t in running_trials if trials[t.number].state == TrialState.FAIL]
    return ReapReport(failed_trials=failed, killed_runs=killed)
