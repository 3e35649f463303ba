"""One training configuration as one tracked MLflow run: reuse, resume, train, record, end.

This is what ``epsstar train`` runs and what every search trial and fine-tune calls. Order
matters for "nothing half-written": the data and the init checkpoint are loaded *before* a run
is created (bad input creates no run), and the run always ends with its true status.
"""

from __future__ import annotations

import csv
import fcntl
import logging
import os
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import mlflow
import torch

from epsstar import tracking
from epsstar.checkpoint import CheckpointError, load_checkpoint
from epsstar.config import ConfigError, EpsstarError, TrainConfig
from epsstar.data import DataBundle, load_data
from epsstar.train import FitResult, fit, make_model

log = logging.getLogger(__name__)

DEFAULT_CHECKPOINT_ROOT = Path("checkpoints")
# Checkpoints are uploaded to the artifact store at the end of a run and at most this often
# during it (local checkpoints are written every epoch): cheap on the digits default, and a run
# killed on one machine can still resume on another from a recent epoch.
# EPSSTAR_UPLOAD_EVERY_S overrides it (0: after every epoch). A failed periodic upload costs a
# warning and is tried again at the next epoch.
UPLOAD_EVERY_S = 300.0
# Retries (about 90 s of back-off) for what a finished run must leave in the tracking store, so a
# tracking server restarting at the end of a long run does not cost the run.
FINAL_ATTEMPTS = 8


@dataclass(frozen=True)
class RunOutcome:
    """The result of :func:`run_training`."""

    run_id: str
    metrics: dict[str, float]  # the final (best_*) metrics of the run
    reused: bool  # True when an identical FINISHED run was found and nothing was trained
    resumed_from_epoch: int = 0  # > 0 when an interrupted run was continued


class RunBusyError(EpsstarError):
    """Another live process on this machine is training the same run."""


# --------------------------------------------------------------------------- init weights
def load_init_weights(init: str, *, map_location: str = "cpu") -> dict[str, torch.Tensor] | None:
    """Weights to fine-tune from: ``scratch`` → None; a checkpoint path; or ``runs:/<run_id>``
    (that run's ``checkpoints/best.pt`` artifact)."""
    if init == "scratch":
        return None
    if init.startswith("runs:/"):
        run_id = init[len("runs:/"):].strip("/").split("/")[0]
        with tempfile.TemporaryDirectory() as tmp:
            path = tracking.download_artifact(run_id, "checkpoints/best.pt", tmp)
            if path is None:
                raise CheckpointError(f"run {run_id} has no checkpoints/best.pt artifact")
            return load_checkpoint(path, map_location=map_location)["model"]
    return load_checkpoint(init, map_location=map_location)["model"]


def _check_model(cfg: TrainConfig, data: DataBundle, weights: dict | None) -> None:
    """Build the model once before any run exists: an unknown arch or a checkpoint of another
    architecture fails here, with nothing written to the tracking store."""
    model = make_model(cfg, data)
    if weights is None:
        return
    try:
        model.load_state_dict(weights)
    except RuntimeError:
        raise ConfigError(f"checkpoint {cfg.init} does not fit arch={cfg.arch} "
                          f"width={cfg.width} dataset={cfg.dataset}") from None


# --------------------------------------------------------------------------- locking / resume
@contextmanager
def _run_lock(directory: Path) -> Iterator[None]:
    """Exclusive lock on a run's checkpoint directory. The OS releases it when the process dies
    (even on SIGKILL), so a held lock means a live trainer and a free one a resumable run."""
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / ".lock", "w") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RunBusyError(f"run in {directory} is being trained by another process") from None
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _lock_is_free(directory: Path) -> bool:
    if not (directory / ".lock").exists():
        return True
    with open(directory / ".lock", "w") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        fcntl.flock(fh, fcntl.LOCK_UN)
        return True


def _fetch_last_checkpoint(run_id: str, directory: Path) -> bool:
    """Make ``directory/last.pt`` available (local, else the run's artifact). True if it is."""
    if (directory / "last.pt").exists():
        return True
    directory.mkdir(parents=True, exist_ok=True)
    for name in ("last.pt", "best.pt"):
        path = tracking.download_artifact(run_id, f"checkpoints/{name}", directory)
        if path is None:
            return False
    return (directory / "last.pt").exists()


def find_resumable(experiment_id: str, cfg: TrainConfig, root: Path) -> str | None:
    """An interrupted run of this exact config whose checkpoint we can reach and nobody holds.

    A run left RUNNING by a process of this machine that died before its first checkpoint
    (its lock file exists and is free) cannot be resumed: it is ended KILLED here, so a
    ``kill -9`` during start-up leaves no run RUNNING once the command is run again.
    """
    for run in tracking.find_unfinished_runs(experiment_id, cfg.config_hash()):
        directory = root / run.info.run_id
        if not _lock_is_free(directory):
            continue
        if _fetch_last_checkpoint(run.info.run_id, directory):
            return run.info.run_id
        if (directory / ".lock").exists():
            tracking.end_if_running(run.info.run_id, "KILLED")
    return None


# --------------------------------------------------------------------------- the workflow
def run_training(
    cfg: TrainConfig,
    *,
    experiment_id: str | None = None,
    parent_run_id: str | None = None,
    tags: dict[str, str] | None = None,
    run_name: str | None = None,
    run_id: str | None = None,
    resume_from_run: str | None = None,
    reuse: bool = True,
    checkpoint_root: str | Path = DEFAULT_CHECKPOINT_ROOT,
    download: bool = False,
    progress: bool | None = None,
    log_model: bool = True,
    on_start: Callable[[str], None] | None = None,
) -> RunOutcome:
    """Train ``cfg`` as a tracked run and return its final metrics.

    Args:
        run_id: log into this existing run (e.g. the run ``mlflow run`` created for us).
        resume_from_run: continue this (dead) run's training from its last checkpoint, as a
            retried trial does: a new run (tagged ``epsstar.resumed_from``; the dead one keeps
            its KILLED status) starts from the checkpoint, copied in from the dead run's
            directory or its ``checkpoints/`` artifacts, with the epochs already done logged.
        reuse: return an identical FINISHED run (same ``epsstar.config_hash``) instead of
            training again.
        on_start: called with the run id as soon as the run exists, before training (a search
            records it in its Optuna trial, so the run of a trial that dies can be ended).
    """
    data = load_data(cfg, download=download)
    init_weights = load_init_weights(cfg.init)
    _check_model(cfg, data, init_weights)
    experiment_id = experiment_id or tracking.get_or_create_experiment()
    root = Path(checkpoint_root)

    if reuse:
        done = tracking.find_finished_run(experiment_id, cfg.config_hash())
        if done is not None:
            return RunOutcome(done.info.run_id, dict(done.data.metrics), reused=True)

    extra_tags = dict(tags or {})
    if parent_run_id:
        extra_tags[tracking.TAG_PARENT] = parent_run_id
    resumable = run_id or (None if resume_from_run else find_resumable(experiment_id, cfg, root))
    if resumable:
        tracker = tracking.RunTracker.attach(resumable, cfg, tags=extra_tags)
    else:
        tracker = tracking.RunTracker.create(cfg, experiment_id=experiment_id,
                                             run_name=run_name, tags=extra_tags)
    directory = root / tracker.run_id
    try:
        if on_start is not None:
            on_start(tracker.run_id)
        if resume_from_run and resume_from_run != tracker.run_id:
            _adopt_checkpoint(resume_from_run, root, directory, tracker)
        with _run_lock(directory):
            result, resumed = _train_tracked(cfg, data, tracker, directory, init_weights,
                                             progress)
            _record(cfg, data, result, tracker, log_model=log_model)
    except BaseException as exc:
        if isinstance(exc, (KeyboardInterrupt, SystemExit)):
            # SIGTERM / Ctrl-C: leave the newest checkpoint where a retry on any machine finds it
            _upload_checkpoints(tracker, directory, attempts=2, required=False)
        tracker.end(tracking.end_status_for(exc))
        raise
    tracker.end("FINISHED")
    return RunOutcome(tracker.run_id, result.best, reused=False, resumed_from_epoch=resumed)


def _adopt_checkpoint(source_run: str, root: Path, directory: Path,
                      tracker: tracking.RunTracker) -> None:
    """Copy a dead run's last checkpoint so a retried trial continues instead of restarting,
    and log the epochs it already holds, so the new run's curves start at epoch 1.

    A checkpoint that does not load (cut short by a kill during its upload, or not ours) is
    left alone: the retry trains from epoch 1 instead of failing its trial.
    """
    src = root / source_run
    if not _fetch_last_checkpoint(source_run, src):
        return
    try:
        history = load_checkpoint(src / "last.pt")["history"]
        load_checkpoint(src / "best.pt")
    except CheckpointError as err:
        warnings.warn(f"not resuming from run {source_run}: {err}; training from epoch 1",
                      stacklevel=2)
        return
    directory.mkdir(parents=True, exist_ok=True)
    for name in ("last.pt", "best.pt"):
        if not (directory / name).exists():
            (directory / name).write_bytes((src / name).read_bytes())
    tracker.set_tags({tracking.TAG_RESUMED_FROM: source_run})
    _log_missing_epochs(tracker, history)


def _log_missing_epochs(tracker: tracking.RunTracker, history: list[dict]) -> None:
    """Log the checkpoint's epochs that the run does not hold yet: a process killed right after
    a checkpoint may not have sent that epoch's metrics, and a resumed run must have them all."""
    tracker.flush()  # what is still queued counts as logged once sent
    logged = {m.step for m in tracking.client().get_metric_history(tracker.run_id,
                                                                   "train_adv_loss")}
    logged |= {m.step for m in tracker.pending}
    for row in history:
        if int(row["epoch"]) not in logged:
            metrics = {k: v for k, v in row.items() if k not in ("epoch", "seconds")}
            tracker.log_metrics(metrics, step=int(row["epoch"]), background=True)


def _train_tracked(cfg, data, tracker, directory, init_weights,
                   progress) -> tuple[FitResult, int]:
    resumed = 0
    if (directory / "last.pt").exists():
        state = load_checkpoint(directory / "last.pt")
        resumed = int(state["epoch"])
        log.info("resuming run %s from epoch %d", tracker.run_id, resumed)
        _log_missing_epochs(tracker, state["history"])
    last_upload = time.monotonic()

    def on_epoch(epoch: int, metrics: dict[str, float]) -> None:
        nonlocal last_upload
        tracker.log_metrics(metrics, step=epoch, background=True)
        if (time.monotonic() - last_upload >= upload_interval_s()
                and _upload_checkpoints(tracker, directory, attempts=2, required=False)):
            last_upload = time.monotonic()

    result = fit(cfg, data, checkpoint_dir=directory, init_weights=init_weights,
                 on_epoch=on_epoch, extra_state={"run_id": tracker.run_id},
                 progress=progress)
    return result, resumed


def upload_interval_s() -> float:
    """Seconds between checkpoint uploads during a run (EPSSTAR_UPLOAD_EVERY_S, else 300)."""
    return float(os.environ.get("EPSSTAR_UPLOAD_EVERY_S", UPLOAD_EVERY_S))


def _upload_checkpoints(tracker: tracking.RunTracker, directory: Path, *,
                        attempts: int = FINAL_ATTEMPTS, required: bool = True) -> bool:
    """Upload ``best.pt`` and ``last.pt`` as ``checkpoints/`` artifacts; True when done.
    Unless ``required``, a failure is a warning (the next upload sends the newer files)."""
    try:
        for name in ("best.pt", "last.pt"):
            if (directory / name).exists():
                tracker.log_artifact(directory / name, "checkpoints", attempts=attempts)
    except Exception as err:  # unreachable store: the local checkpoint is still there
        if required:
            raise
        warnings.warn(f"checkpoint upload of run {tracker.run_id} failed "
                      f"({tracking.short_error(err)}); tried again later", stacklevel=2)
        return False
    return True


def _record(cfg: TrainConfig, data: DataBundle, result: FitResult,
            tracker: tracking.RunTracker, *, log_model: bool) -> None:
    """Final metrics and artifacts: config, per-epoch CSV, checkpoints, the MLflow model."""
    tracker.log_metrics(result.best, step=0)
    _upload_checkpoints(tracker, result.checkpoint_dir)
    tracker.log_dict(cfg.to_params(), "config.json", attempts=FINAL_ATTEMPTS)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "epochs.csv"
        with open(path, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(result.history[0]))
            writer.writeheader()
            writer.writerows(result.history)
        tracker.log_artifact(path, attempts=FINAL_ATTEMPTS)
    if log_model:
        shape = (data.in_channels, data.image_size, data.image_size)
        _log_mlflow_model(result.model, tracker.run_id, shape)


def _log_mlflow_model(model: torch.nn.Module, run_id: str, shape: tuple[int, int, int]) -> None:
    """Log the best weights as an MLflow model (``mlflow.pytorch.load_model('runs:/ID/model')``),
    in the pt2 (torch.export) format, which loads without unpickling arbitrary objects."""
    model = model.cpu().eval()
    example = torch.rand(2, *shape)  # (B, C, H, W) pixels in [0, 1]
    nested = mlflow.active_run() is not None
    # The fluent API is the only way to log an MLflow 3 model to a run; the context is left
    # without ending the run's final status decision, which RunTracker.end makes right after.
    with mlflow.start_run(run_id=run_id, nested=nested):
        mlflow.pytorch.log_model(model, name="model", input_example=example.numpy(),
                                 pip_requirements=[f"torch=={torch.__version__.split('+')[0]}"])
    tracking.client().update_run(run_id, status="RUNNING")


def default_checkpoint_root() -> Path:
    return Path(os.environ.get("EPSSTAR_CHECKPOINT_DIR", DEFAULT_CHECKPOINT_ROOT))
