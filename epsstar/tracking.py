"""The MLflow run lifecycle in one place.

Start or resume a run, log per-epoch metrics in one batched call with retries, end the run with
its true status (FINISHED / FAILED / KILLED — never left RUNNING), find an identical finished run
by config hash, and read runs back. Everything goes through :class:`mlflow.MlflowClient` with an
explicit run id, so nothing depends on MLflow's global "active run" (a search process holds a
parent run while its trials train child runs, possibly in other processes).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import subprocess
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import mlflow
from mlflow.entities import Metric, Param, RunStatus, RunTag
from mlflow.exceptions import MlflowException

from epsstar.config import EpsstarError, TrainConfig

log = logging.getLogger(__name__)
T = TypeVar("T")

DEFAULT_EXPERIMENT = "epsstar"
TAG_ROLE = "epsstar.role"
TAG_HASH = "epsstar.config_hash"
TAG_STUDY = "epsstar.study"
TAG_TRIAL = "epsstar.trial"
TAG_PARENT = "mlflow.parentRunId"
TAG_GIT = "mlflow.source.git.commit"
TAG_RESUMED_FROM = "epsstar.resumed_from"  # the dead run whose checkpoint a retried trial adopted


class TrackingError(EpsstarError):
    """The tracking store cannot be reached or refused a request we cannot do without."""


# --------------------------------------------------------------------------- connection
def client() -> mlflow.MlflowClient:
    """A client for the configured tracking URI (MLFLOW_TRACKING_URI, else MLflow's default)."""
    return mlflow.MlflowClient()


@contextlib.contextmanager
def fail_fast() -> Iterator[None]:
    """Temporarily lower MLflow's HTTP retries: a wrong tracking URI should fail in seconds, not
    after MLflow's two minutes of back-off."""
    saved = {k: os.environ.get(k) for k in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES",
                                            "MLFLOW_HTTP_REQUEST_TIMEOUT")}
    os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = "1"
    os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] = "10"
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def get_or_create_experiment(name: str | None = None) -> str:
    """Experiment id for ``name`` (default: MLFLOW_EXPERIMENT_ID / MLFLOW_EXPERIMENT_NAME, else
    "epsstar"). Race-safe: two workers creating the same experiment at once both succeed.
    Also checks that the tracking store answers at all (one clear error if it does not)."""
    if name is None and os.environ.get("MLFLOW_EXPERIMENT_ID"):
        return os.environ["MLFLOW_EXPERIMENT_ID"]
    name = name or os.environ.get("MLFLOW_EXPERIMENT_NAME") or DEFAULT_EXPERIMENT
    c = client()
    try:
        with fail_fast():
            exp = c.get_experiment_by_name(name)
            if exp is not None:
                return exp.experiment_id
            try:
                return c.create_experiment(name)
            except MlflowException as err:
                if err.error_code != "RESOURCE_ALREADY_EXISTS":
                    raise
                return c.get_experiment_by_name(name).experiment_id
    except Exception as err:  # connection refused, DNS, bad scheme, permission...
        raise TrackingError(_describe_failure(mlflow.get_tracking_uri(), err)) from None


_NETWORK_HINTS = ("Connection refused", "Max retries exceeded", "Name or service not known",
                  "timed out", "Failed to establish a new connection")


def _describe_failure(uri: str, err: BaseException) -> str:
    text = str(err)
    if any(hint in text for hint in _NETWORK_HINTS):
        return f"cannot reach tracking store {uri}: no server answers there"
    return f"tracking store {uri}: {short_error(err)}"


def short_error(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return (text[0] if text else type(err).__name__)[:200]


# Answers no retry can change: wrong credentials, or a user without permission on the
# experiment (basic-auth). They fail at once with one clear line, not after the back-off.
_REFUSALS = ("UNAUTHENTICATED", "PERMISSION_DENIED")


def retry(fn: Callable[[], T], *, what: str, attempts: int = 5, delay: float = 1.0) -> T:
    """Call ``fn``; on failure warn and retry with exponential back-off; re-raise the last error.

    A tracking outage in the middle of a 10-hour run must cost a warning, not the run. A refusal
    by the server's authentication raises :class:`TrackingError` at once.
    """
    for attempt in range(1, attempts + 1):
        try:
            return fn()
        except Exception as err:  # network errors come as many types; all are retried
            if getattr(err, "error_code", None) in _REFUSALS:
                user = os.environ.get("MLFLOW_TRACKING_USERNAME", "(no user)")
                raise TrackingError(
                    f"MLflow {what} refused for {user}: {short_error(err)}") from None
            if attempt == attempts:
                raise
            warnings.warn(
                f"MLflow {what} failed ({short_error(err)}); retry {attempt}/{attempts - 1} "
                f"in {delay:.0f}s", stacklevel=2,
            )
            time.sleep(delay)
            delay = min(delay * 2, 30.0)
    raise AssertionError("unreachable")


def git_commit() -> str | None:
    """The commit of the code that runs, when it runs from a git checkout."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
            cwd=Path(__file__).resolve().parent,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


# --------------------------------------------------------------------------- finding runs
def _search(experiment_id: str, filter_string: str, max_results: int = 1000) -> list:
    return client().search_runs(
        [experiment_id], filter_string=filter_string, max_results=max_results,
        order_by=["attributes.start_time DESC"],
    )


def find_finished_run(experiment_id: str, config_hash: str):
    """The newest FINISHED run with this config hash, or None (an identical run to reuse)."""
    runs = _search(
        experiment_id,
        f"tags.`{TAG_HASH}` = '{config_hash}' and attributes.status = 'FINISHED'",
        max_results=1,
    )
    return runs[0] if runs else None


def find_unfinished_runs(experiment_id: str, config_hash: str) -> list:
    """Runs with this config hash that did not finish (candidates to resume), newest first."""
    runs = _search(experiment_id, f"tags.`{TAG_HASH}` = '{config_hash}'")
    return [r for r in runs if r.info.status != "FINISHED"]


# --------------------------------------------------------------------------- one run
@dataclass
class RunTracker:
    """Logging for one training run, identified by ``run_id``.

    Metrics that fail to log (tracking outage) are kept and sent with the next flush, so no
    epoch is lost as long as the store comes back before the run ends.
    """

    run_id: str
    pending: list[Metric] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _sending: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _executor: ThreadPoolExecutor | None = field(default=None, repr=False)
    _inflight: Future | None = field(default=None, repr=False)

    @classmethod
    def create(
        cls,
        cfg: TrainConfig,
        *,
        experiment_id: str,
        run_name: str | None = None,
        parent_run_id: str | None = None,
        tags: dict[str, str] | None = None,
    ) -> RunTracker:
        """Create a new run with the config's params and the contract's tags."""
        all_tags = {TAG_ROLE: cfg.role, TAG_HASH: cfg.config_hash(), **(tags or {})}
        if parent_run_id:
            all_tags[TAG_PARENT] = parent_run_id
        commit = git_commit()
        if commit:
            all_tags[TAG_GIT] = commit
        run = retry(lambda: client().create_run(
            experiment_id, run_name=run_name or default_run_name(cfg), tags=all_tags),
            what="create_run")
        tracker = cls(run.info.run_id)
        tracker.log_params(cfg.to_params())
        return tracker

    @classmethod
    def attach(cls, run_id: str, cfg: TrainConfig | None = None,
               tags: dict[str, str] | None = None) -> RunTracker:
        """Use an existing run (e.g. the one ``mlflow run`` created, or one being resumed)."""
        tracker = cls(run_id)
        retry(lambda: client().update_run(run_id, status="RUNNING"), what="update_run")
        all_tags = dict(tags or {})
        if cfg is not None:
            existing = client().get_run(run_id).data.params
            params = {k: v for k, v in cfg.to_params().items() if k not in existing}
            tracker.log_params(params)
            all_tags.update({TAG_ROLE: cfg.role, TAG_HASH: cfg.config_hash()})
        tracker.set_tags(all_tags)
        return tracker

    # ---------------------------------------------------------------- logging
    def log_params(self, params: dict[str, Any]) -> None:
        items = [Param(k, str(v)) for k, v in params.items()]
        for i in range(0, len(items), 100):  # MLflow accepts at most 100 params per batch
            chunk = items[i:i + 100]
            retry(lambda c=chunk: client().log_batch(self.run_id, params=c), what="log params")

    def set_tags(self, tags: dict[str, str]) -> None:
        if tags:
            items = [RunTag(k, str(v)) for k, v in tags.items()]
            retry(lambda: client().log_batch(self.run_id, tags=items), what="set tags")

    def log_metrics(self, metrics: dict[str, float], step: int = 0, *,
                    background: bool = False) -> None:
        """Queue metrics and flush them in one call.

        ``background=True`` (per-epoch metrics) sends them from a worker thread so training
        never waits for the tracking store; what fails stays queued for the next flush.
        """
        now = int(time.time() * 1000)
        with self._lock:
            self.pending += [Metric(k, float(v), now, step) for k, v in metrics.items()]
        if not background:
            self.flush(attempts=2)
        elif self._inflight is None or self._inflight.done():
            if self._executor is None:
                self._executor = ThreadPoolExecutor(1, thread_name_prefix="mlflow-log")
            self._inflight = self._executor.submit(self.flush, 2)

    def flush(self, attempts: int = 5) -> bool:
        """Send queued metrics; on failure keep them for the next flush and return False."""
        with self._sending:  # one flush at a time: a value is never sent twice or dropped
            return self._send_pending(attempts)

    def _send_pending(self, attempts: int) -> bool:
        with self._lock:
            batch = list(self.pending)
        if not batch:
            return True
        try:
            for i in range(0, len(batch), 1000):  # MLflow's per-request metric limit
                chunk = batch[i:i + 1000]
                retry(lambda c=chunk: client().log_batch(self.run_id, metrics=c),
                      what="log metrics", attempts=attempts)
        except Exception as err:
            warnings.warn(f"MLflow unreachable ({short_error(err)}); {len(batch)} metric values "
                          "kept and retried at the next flush", stacklevel=2)
            return False
        with self._lock:
            del self.pending[:len(batch)]  # new values may have been queued meanwhile
        return True

    def wait(self) -> None:
        """Let a background flush finish (before the final flush or a status change)."""
        if self._inflight is not None:
            self._inflight.result()
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None

    def log_artifact(self, path: str | Path, artifact_path: str | None = None, *,
                     attempts: int = 5) -> None:
        retry(lambda: client().log_artifact(self.run_id, str(path), artifact_path),
              what="log artifact", attempts=attempts)

    def log_dict(self, data: dict, name: str, *, attempts: int = 5) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / name
            path.write_text(json.dumps(data, indent=2, sort_keys=True, default=str))
            self.log_artifact(path, attempts=attempts)

    def end(self, status: str = "FINISHED") -> None:
        """Flush what is pending (longer retries: it is the last chance) and set the status."""
        self.wait()
        self.flush(attempts=8)
        RunStatus.from_string(status)  # validates the name
        retry(lambda: client().set_terminated(self.run_id, status=status), what="end run",
              attempts=8)


def default_run_name(cfg: TrainConfig) -> str:
    eps = f"{cfg.eps_255:g}/255" if cfg.eps else "clean"
    return f"{cfg.role}-{cfg.dataset}-{cfg.arch}-{cfg.norm}-{eps}-s{cfg.seed}"


def end_status_for(exc: BaseException | None) -> str:
    """FINISHED for a normal end, KILLED for Ctrl-C / SIGTERM, FAILED for anything else."""
    if exc is None:
        return "FINISHED"
    if isinstance(exc, (KeyboardInterrupt, SystemExit)):
        return "KILLED"
    return "FAILED"


def end_if_running(run_id: str, status: str = "KILLED") -> bool:
    """End a run that a dead process left RUNNING (a FINISHED or FAILED run keeps its status).

    Returns True when the run was RUNNING and now has ``status``.
    """
    RunStatus.from_string(status)  # validates the name
    run = retry(lambda: client().get_run(run_id), what="get_run")
    if run.info.status != "RUNNING":
        return False
    retry(lambda: client().set_terminated(run_id, status=status), what="end run")
    return True


def run_params(run_id: str) -> dict[str, str]:
    return client().get_run(run_id).data.params


def download_artifact(run_id: str, artifact_path: str, dst: str | Path) -> Path | None:
    """Download one artifact of a run; None when the run has no such artifact."""
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # quiet in logs
    try:
        return Path(mlflow.artifacts.download_artifacts(
            run_id=run_id, artifact_path=artifact_path, dst_path=str(dst)))
    except Exception:  # missing artifact or unreachable store: the caller falls back
        return None
