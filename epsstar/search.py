"""``find_epsstar``: clean run → R*(0) → Optuna bisection over ε → ε* with its bracket and report.

One parent MLflow run (``epsstar.role=search``) holds the answer; the clean run and every trial
are child runs trained through :func:`epsstar.run.run_training`, so identical finished runs are
reused and a rerun of the same command trains nothing new. The Optuna study holds the search
state (the sampler keeps none), so a crashed driver or another worker continues the same search.

The study also records what a worker needs to join from another process or machine (the parent
run id, the experiment id and the full TrainConfig, as user attributes): :func:`start_search`
prepares a search, :func:`run_trials` trains its trials in any number of processes (see
:mod:`epsstar.lab`), :func:`finish_search` summarizes it.
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import mlflow
import optuna

from epsstar import tracking
from epsstar.config import ConfigError, EpsstarError, SearchConfig, TrainConfig
from epsstar.estimate import Estimate
from epsstar.run import RunOutcome, run_training
from epsstar.sampler import (
    BisectionSampler,
    ensure_compatible,
    estimate_from_study,
    study_settings,
)

log = logging.getLogger(__name__)

# How long a trial may go without a heartbeat before another worker declares it dead and
# retries it. Training writes a heartbeat every HEARTBEAT_S; a GPU epoch can be long, but the
# heartbeat comes from a thread of Optuna's, not from the training loop. EPSSTAR_HEARTBEAT_S and
# EPSSTAR_GRACE_S override them (whole seconds, as Optuna requires).
HEARTBEAT_S = 20
GRACE_S = 60
MAX_RETRY = 3  # a dead trial's ε is queued again at most this many times

# Study user attributes that let a worker rebuild the search from the study alone.
LAB_ATTRS = ("parent_run_id", "experiment_id", "train_config")


@dataclass(frozen=True)
class SearchResult:
    """What ``find_epsstar`` answers."""

    parent_run_id: str
    study_name: str
    threshold: float  # R*(0)
    clean_run_id: str
    estimate: Estimate
    n_adversarial_runs: int
    trials: list[dict[str, Any]]  # one row per finished trial: eps, loss, run_id, ...


# --------------------------------------------------------------------------- names / storage
def default_study_name(cfg: TrainConfig) -> str:
    """One study per configuration (everything but ε)."""
    return f"epsstar-{cfg.dataset}-{cfg.arch}-{cfg.norm}-{cfg.family_hash()}"


def default_storage() -> str:
    """A SQLite file next to the MLflow store when that is a local file, else in the cwd."""
    uri = mlflow.get_tracking_uri()
    parsed = urlparse(uri)
    if parsed.scheme == "sqlite" and uri.startswith("sqlite:///"):
        directory = Path(uri[len("sqlite:///"):]).parent
    elif parsed.scheme in ("", "file"):
        directory = Path(parsed.path or uri).parent
    else:
        directory = Path.cwd()
    return f"sqlite:///{(directory / 'optuna.db').resolve()}"


def check_storage(url: str, workers: int) -> None:
    """Refuse SQLite for several workers: it locks the whole database on every write, so with
    several worker processes trials time out (use PostgreSQL, or a JournalStorage file on one
    machine)."""
    if url.startswith("sqlite") and workers > 1:
        raise ConfigError("SQLite storage cannot serve several workers (it locks the whole "
                          "database); use --storage postgresql+psycopg2://... or a journal file "
                          "(--storage journal:///path/optuna.journal) on one machine")


def open_storage(url: str, *, workers: int = 1) -> optuna.storages.BaseStorage:
    """An Optuna storage with heartbeats (so dead workers' trials are detected and retried).

    A trial whose heartbeat is older than the grace period is failed by the next worker that
    starts a trial (or by ``epsstar reap``) and handed to :func:`retry_dead_trial`. A journal
    file has no heartbeats: there a dead worker's trial stays RUNNING (the sampler plans around
    it). SQLite is refused for more than one worker (:func:`check_storage`).
    """
    check_storage(url, workers)
    if url.startswith("journal:///"):
        backend = optuna.storages.journal.JournalFileBackend(url[len("journal:///") - 1:])
        return optuna.storages.JournalStorage(backend)
    try:
        warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
        return optuna.storages.RDBStorage(
            url, heartbeat_interval=_seconds("EPSSTAR_HEARTBEAT_S", HEARTBEAT_S),
            grace_period=_seconds("EPSSTAR_GRACE_S", GRACE_S),
            heartbeat_stale_trial_callback=retry_dead_trial,
        )
    except Exception as err:
        hint = (" (SQLAlchemy reads postgresql:// as the psycopg 3 driver; write "
                "postgresql+psycopg2://... for psycopg2)" if "psycopg" in str(err) else "")
        raise EpsstarError(f"cannot open Optuna storage {_shown(url)}: "
                           f"{tracking.short_error(err)}{hint}") from None


def _shown(url: str) -> str:
    """A storage URL as printed: a password in it is masked."""
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # not a database URL (journal:///...): nothing to hide
        return url


def _seconds(name: str, default: int) -> int:
    try:
        value = int(os.environ.get(name, default))
    except ValueError:
        raise ConfigError(f"{name} must be a whole number of seconds") from None
    if value < 1:
        raise ConfigError(f"{name} must be >= 1, got {value}")
    return value


def retry_dead_trial(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
    """The fate of a trial whose worker died (stale heartbeat, or an orphan / interrupted trial):
    its MLflow run (the ``run_id`` user attr) is ended KILLED and, unless the search is already
    over, Optuna's RetryHeartbeatStaleTrialCallback queues the same ε again (the retry's system
    attr ``failed_trial`` names the original trial); the retry resumes from the dead run's last
    checkpoint (see :func:`make_objective`)."""
    run_id = trial.user_attrs.get("run_id")
    if run_id:
        try:
            tracking.end_if_running(run_id, "KILLED")
        except Exception as err:  # tracking store down: `epsstar reap` ends the run later
            log.warning("run %s of dead trial %d not ended: %s", run_id, trial.number,
                        tracking.short_error(err))
    sampler = study.sampler
    if isinstance(sampler, BisectionSampler) and sampler.stop_reason(study) is not None:
        return
    optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=MAX_RETRY)(study, trial)


def load_search_study(study_name: str, storage: str, *, workers: int = 1) -> optuna.Study:
    """A study prepared by :func:`start_search`, with its BisectionSampler rebuilt from the
    settings the study records (so any process can join or inspect the search)."""
    opened = open_storage(storage, workers=workers)
    try:
        plain = optuna.load_study(study_name=study_name, storage=opened)
    except KeyError:
        raise ConfigError(f"no study {study_name!r} in {_shown(storage)}") from None
    missing = [key for key in LAB_ATTRS if key not in plain.user_attrs]
    if missing:
        raise ConfigError(f"study {study_name!r} was not prepared by find_epsstar "
                          f"(no {', '.join(missing)} user attribute)")
    settings = {k: v for k, v in study_settings(plain).items() if k != "sampler"}
    return optuna.load_study(study_name=study_name, storage=opened,
                             sampler=BisectionSampler(**settings))


# --------------------------------------------------------------------------- the parent run
def _parent_run(cfg: TrainConfig, study_name: str, experiment_id: str) -> tracking.RunTracker:
    """The run ``mlflow run`` made for us, else the last search run of this study (a rerun
    continues it), else a new one."""
    tags = {tracking.TAG_ROLE: "search", tracking.TAG_STUDY: study_name}
    env_run = _env_run_id()
    if env_run:  # MLflow names it at random; a search name reads better in the UI
        tracker = tracking.RunTracker(env_run)
        tracker.set_tags({**tags, "mlflow.runName": f"search-{cfg.dataset}-{cfg.arch}-{cfg.norm}"})
        return tracker
    runs = tracking.client().search_runs(
        [experiment_id], max_results=1, order_by=["attributes.start_time DESC"],
        filter_string=f"tags.`{tracking.TAG_ROLE}` = 'search' and "
                      f"tags.`{tracking.TAG_STUDY}` = '{study_name}'",
    )
    if runs:
        tracker = tracking.RunTracker.attach(runs[0].info.run_id, tags=tags)
        return tracker
    run = tracking.retry(lambda: tracking.client().create_run(
        experiment_id, run_name=f"search-{cfg.dataset}-{cfg.arch}-{cfg.norm}", tags=tags),
        what="create_run")
    tracker = tracking.RunTracker(run.info.run_id)
    params = {k: v for k, v in cfg.to_params().items() if k not in ("eps", "eps_255")}
    tracker.log_params(params)
    return tracker


def _env_run_id() -> str | None:
    import os

    return os.environ.get("MLFLOW_RUN_ID")


# --------------------------------------------------------------------------- the objective
def make_objective(cfg: TrainConfig, *, experiment_id: str, parent_run_id: str,
                   study_name: str, checkpoint_root: Path, log_model: bool,
                   download: bool = False):
    """Objective for ``study.optimize``: train at the proposed ε, return R̂(θ̂(ε), ε).

    The trial's ``run_id`` user attr is set as soon as its run exists, so the run of a trial
    whose worker dies can be ended KILLED and its checkpoint adopted by the retry.
    """

    def objective(trial: optuna.Trial) -> float:
        eps = trial.suggest_float("eps", trial.study.user_attrs["eps_low"],
                                  trial.study.user_attrs["eps_high"], log=True)
        retried_from = _retried_run(trial)
        outcome = run_training(
            cfg.replace(eps=eps), experiment_id=experiment_id, parent_run_id=parent_run_id,
            tags={tracking.TAG_STUDY: study_name, tracking.TAG_TRIAL: str(trial.number)},
            checkpoint_root=checkpoint_root, log_model=log_model, resume_from_run=retried_from,
            progress=False, download=download,
            on_start=lambda run_id: trial.set_user_attr("run_id", run_id),
        )
        trial.set_user_attr("run_id", outcome.run_id)
        trial.set_user_attr("reused", outcome.reused)
        return outcome.metrics["best_train_adv_loss"]  # NaN would mark the trial FAILED

    return objective


def _retried_run(trial: optuna.Trial) -> str | None:
    """The MLflow run of the dead trial this one retries: the last of its ``retry_history``
    (Optuna's retry callback lists the dead attempts; the latest got furthest)."""
    trials = trial.study.get_trials(deepcopy=False)
    history = trials[trial.number].system_attrs.get("retry_history") or []
    return trials[history[-1]].user_attrs.get("run_id") if history else None


def _print_trial(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
    """One line per finished trial (Optuna's own INFO log is silenced: it prints every param)."""
    eps = trial.params.get("eps")
    where = f"eps={eps * 255:.4g}/255" if eps is not None else "no eps"
    value = f"adv train loss {trial.value:.4f}" if trial.value is not None else trial.state.name
    reused = " (reused)" if trial.user_attrs.get("reused") else ""
    print(f"trial {trial.number}: {where} -> {value}{reused}", flush=True)


# --------------------------------------------------------------------------- the workflow
def create_or_load_study(
    cfg: TrainConfig, search: SearchConfig, *, threshold: float, clean_train_loss: float,
    lower_guess: float | None = None, initial_guess: float | None = None,
) -> optuna.Study:
    """The study for this configuration; refuses to mix threshold or norm with an old one."""
    name = search.study_name or default_study_name(cfg)
    storage = open_storage(search.storage or default_storage(), workers=search.workers)
    sampler = BisectionSampler(
        threshold=threshold, eps_low=search.eps_low, eps_high=search.eps_high, rtol=search.rtol,
        clean_train_loss=clean_train_loss, lower_guess=lower_guess, initial_guess=initial_guess,
        max_trials=search.max_trials,
    )
    study = optuna.create_study(study_name=name, storage=storage, sampler=sampler,
                                direction="minimize", load_if_exists=True)
    identity = {"norm": cfg.norm, "dataset": cfg.dataset, "arch": cfg.arch,
                "config_hash": cfg.family_hash()}
    ensure_compatible(study, threshold, **identity)
    sampler.check_study(study)  # records threshold, range, rtol... as study user attrs
    for key, value in identity.items():
        study.set_user_attr(key, value)
    return study


@dataclass
class SearchSession:
    """A prepared search: its parent run, the clean run that set R*(0), and the study that
    workers join (the study's user attributes hold everything they need, see LAB_ATTRS)."""

    cfg: TrainConfig  # eps = 0; each trial trains cfg.replace(eps=...)
    experiment_id: str
    parent: tracking.RunTracker
    clean: RunOutcome
    study: optuna.Study
    storage: str  # the Optuna storage URL workers open
    threshold: float  # R*(0)

    @property
    def study_name(self) -> str:
        return self.study.study_name


def find_epsstar(
    cfg: TrainConfig,
    search: SearchConfig,
    *,
    experiment_id: str | None = None,
    checkpoint_root: str | Path = "checkpoints",
    log_model: bool = True,
    download: bool = False,
) -> SearchResult:
    """The whole search. ``cfg.eps`` is ignored (the clean run uses 0, trials the sampler's ε).

    With ``search.workers > 1`` the trials run in that many local ``epsstar worker`` processes
    (started once the study exists; workers on other machines may join the same study).
    """
    check_storage(search.storage or default_storage(), search.workers)  # before any training
    session = start_search(cfg, search, experiment_id=experiment_id,
                           checkpoint_root=checkpoint_root, log_model=log_model,
                           download=download)
    try:
        if search.workers > 1:
            from epsstar.lab import run_local_workers  # lab.py builds on this module

            run_local_workers(session, search.workers, checkpoint_root=checkpoint_root,
                              log_model=log_model, download=download)
        else:
            _fail_orphans(session.study, session.storage)
            run_trials(session.study, session.cfg, experiment_id=session.experiment_id,
                       parent_run_id=session.parent.run_id, checkpoint_root=checkpoint_root,
                       log_model=log_model, download=download, n_trials=search.max_trials)
        return finish_search(session)
    except BaseException as exc:
        session.parent.end(tracking.end_status_for(exc))
        raise


def start_search(
    cfg: TrainConfig,
    search: SearchConfig,
    *,
    experiment_id: str | None = None,
    checkpoint_root: str | Path = "checkpoints",
    log_model: bool = True,
    download: bool = False,
) -> SearchSession:
    """Everything before the first trial: the parent run, the clean run (R*(0)), the study,
    and the study's LAB_ATTRS. The parent run ends FAILED/KILLED if this fails."""
    cfg = cfg.replace(eps=0.0)
    experiment_id = experiment_id or tracking.get_or_create_experiment()
    name = search.study_name or default_study_name(cfg)
    parent = _parent_run(cfg, name, experiment_id)
    try:
        return _prepare(cfg, search, parent, name, experiment_id, Path(checkpoint_root),
                        log_model=log_model, download=download)
    except BaseException as exc:
        parent.end(tracking.end_status_for(exc))
        raise


def finish_search(session: SearchSession) -> SearchResult:
    """Summarize the study on the parent run (ε*, bracket, report) and end the parent run."""
    result = summarize(session.study, session.parent, session.clean, session.threshold,
                       session.study_name)
    if not _env_run_id():  # `mlflow run` ends its own run when the command exits
        session.parent.end("FINISHED")
    else:
        session.parent.flush()
    return result


def _prepare(cfg, search, parent, name, experiment_id, root, *, log_model, download):
    clean = run_training(cfg, experiment_id=experiment_id, parent_run_id=parent.run_id,
                         tags={tracking.TAG_STUDY: name}, checkpoint_root=root,
                         log_model=log_model, download=download, progress=False)
    threshold = clean.metrics["best_test_clean_loss"]  # R*(0)
    clean_train_loss = clean.metrics["best_train_adv_loss"]
    parent.log_params({"study_name": name, "rtol": search.rtol, "eps_low": search.eps_low,
                       "eps_high": search.eps_high, "clean_run_id": clean.run_id}
                      if not _has_param(parent.run_id, "study_name") else {})
    lower_guess = _clean_lower_guess(cfg, clean, threshold, search, root) \
        if search.clean_guess else None
    study = create_or_load_study(cfg, search, threshold=threshold,
                                 clean_train_loss=clean_train_loss, lower_guess=lower_guess)
    lab = {"parent_run_id": parent.run_id, "experiment_id": experiment_id,
           "train_config": asdict(cfg)}
    for key, value in lab.items():
        if study.user_attrs.get(key) != value:
            study.set_user_attr(key, value)
    return SearchSession(cfg, experiment_id, parent, clean, study,
                         search.storage or default_storage(), threshold)


def run_trials(
    study: optuna.Study,
    cfg: TrainConfig,
    *,
    experiment_id: str,
    parent_run_id: str,
    checkpoint_root: str | Path = "checkpoints",
    log_model: bool = True,
    download: bool = False,
    n_trials: int | None = None,
) -> None:
    """Train trials at the sampler's ε until it stops the search (or after ``n_trials`` here).

    Trials run through ``study.optimize``, so the storage's heartbeats mark them alive and a
    dead worker's trial is failed and retried (:func:`retry_dead_trial`). A diverged or
    refused run fails its trial (the sampler ignores failed trials). On Ctrl-C or SIGTERM the
    interrupted trial is queued again before the interrupt goes on: its run ends KILLED with
    its checkpoint uploaded, and the next worker resumes it.
    """
    if _study_done(study):
        return
    objective = make_objective(cfg, experiment_id=experiment_id, parent_run_id=parent_run_id,
                               study_name=study.study_name, checkpoint_root=Path(checkpoint_root),
                               log_model=log_model, download=download)
    started: list[int] = []

    def tracked(trial: optuna.Trial) -> float:
        started.append(trial.number)
        return objective(trial)

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        study.optimize(tracked, n_trials=n_trials, catch=(EpsstarError, FloatingPointError),
                       callbacks=[_print_trial])
    except KeyboardInterrupt:
        if started:
            _requeue(study, started[-1])
        raise


def _requeue(study: optuna.Study, number: int) -> None:
    trial = study.get_trials(deepcopy=False)[number]
    if trial.state == optuna.trial.TrialState.FAIL:  # Optuna fails an interrupted trial
        retry_dead_trial(study, trial)


def _has_param(run_id: str, key: str) -> bool:
    return key in tracking.run_params(run_id)


def _study_done(study: optuna.Study) -> bool:
    return study.sampler.stop_reason(study) is not None


def _fail_orphans(study: optuna.Study, storage_url: str) -> None:
    """With one worker on a SQLite or journal file (one process at a time), a RUNNING trial
    left in the study belongs to a process that died (crash, kill -9): fail it now, so its ε is
    queued again at once instead of after the heartbeat grace period. A server database may
    serve live workers on other machines: there only heartbeats say which trial is dead."""
    if not storage_url.startswith(("sqlite", "journal")):
        return
    storage = study._storage
    for trial in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        if storage.set_trial_state_values(trial._trial_id, optuna.trial.TrialState.FAIL):
            retry_dead_trial(study, study.get_trials(deepcopy=False)[trial.number])


def _clean_lower_guess(cfg: TrainConfig, clean: RunOutcome, threshold: float,
                       search: SearchConfig, root: Path) -> float | None:
    """A free lower guess of ε*: the clean model's own attacked training loss at ε bounds what
    adversarial training at ε reaches from above, so where it is still ≤ R*(0), ε ≤ ε*."""
    from epsstar.guess import clean_model_lower_guess

    try:
        return clean_model_lower_guess(cfg, clean.run_id, threshold, search.eps_low,
                                       search.eps_high, root)
    except EpsstarError as err:
        log.warning("no clean-model lower guess: %s", err)
        return None


# --------------------------------------------------------------------------- results
def trial_rows(study: optuna.Study) -> list[dict[str, Any]]:
    rows = []
    for t in study.get_trials(deepcopy=False):
        rows.append({
            "trial": t.number, "state": t.state.name, "eps": t.params.get("eps"),
            "eps_255": (t.params["eps"] * 255) if "eps" in t.params else None,
            "adv_train_loss": t.value, "run_id": t.user_attrs.get("run_id"),
            "reused": t.user_attrs.get("reused"),
        })
    return rows


def summarize(study: optuna.Study, parent: tracking.RunTracker, clean: RunOutcome,
              threshold: float, name: str) -> SearchResult:
    """Log ε*, its bracket and the report artifacts on the parent run."""
    from epsstar.plots import loss_vs_eps_figure

    estimate = estimate_from_study(study, threshold)
    rows = trial_rows(study)
    n_runs = sum(1 for r in rows if r["state"] == "COMPLETE")
    parent.log_metrics({
        "threshold": threshold, "epsstar": _finite(estimate.epsstar),
        "epsstar_255": _finite(estimate.epsstar) * 255, "epsstar_lower": estimate.lower,
        "epsstar_upper": _finite(estimate.upper), "n_adversarial_runs": n_runs,
        "clean_train_loss": clean.metrics["best_train_adv_loss"],
    })
    result = SearchResult(parent.run_id, name, threshold, clean.run_id, estimate, n_runs, rows)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        import pandas as pd

        pd.DataFrame(rows).to_csv(tmp / "trials.csv", index=False)
        (tmp / "summary.md").write_text(summary_markdown(result))
        (tmp / "estimate.json").write_text(json.dumps(asdict(estimate), default=str, indent=2))
        points = [(r["eps"], r["adv_train_loss"]) for r in rows if r["state"] == "COMPLETE"]
        fig = loss_vs_eps_figure(points, threshold, estimate,
                                 clean_train_loss=clean.metrics["best_train_adv_loss"])
        fig.savefig(tmp / "loss_vs_eps.png", dpi=120, bbox_inches="tight")
        for path in tmp.iterdir():
            parent.log_artifact(path, "report")
    return result


def _finite(x: float) -> float:
    """MLflow stores metrics as floats but the UI cannot plot inf: bounds are logged as NaN."""
    return x if math.isfinite(x) else float("nan")


def describe(estimate: Estimate) -> str:
    """One line: ε* in pixel units and /255, with the bracket or the bound."""
    e = estimate
    if e.bound == "above":
        return f"eps* > {e.lower:.5g} ({e.lower * 255:.3g}/255): no crossing below eps_high"
    if e.bound == "below":
        return f"eps* < {e.upper:.5g} ({e.upper * 255:.3g}/255): crossing below eps_low"
    return (f"eps* = {e.epsstar:.5g} ({e.epsstar * 255:.3g}/255), bracket "
            f"[{e.lower * 255:.3g}, {e.upper * 255:.3g}]/255"
            f"{' (isotonic fit of a non-monotone curve)' if e.isotonic else ''}")


def summary_markdown(result: SearchResult) -> str:
    lines = [
        f"# eps* search `{result.study_name}`", "",
        f"- R*(0) (clean test loss of the clean run `{result.clean_run_id}`): "
        f"{result.threshold:.4f}",
        f"- {describe(result.estimate)}",
        f"- adversarial runs: {result.n_adversarial_runs}", "",
        "| trial | state | eps (/255) | adv train loss | run |", "|---|---|---|---|---|",
    ]
    for r in result.trials:
        eps = f"{r['eps_255']:.4g}" if r["eps_255"] is not None else ""
        loss = f"{r['adv_train_loss']:.4f}" if r["adv_train_loss"] is not None else ""
        lines.append(f"| {r['trial']} | {r['state']} | {eps} | {loss} | {r['run_id'] or ''} |")
    return "\n".join(lines) + "\n"
