"""``epsstar report``: the finished runs of a tracking store, grouped by configuration, as the
paper's tables and figures.

Reads the tracking store only (any MLflow tracking URI), writes ``report.md``, a self-contained
``report.html``, ``runs.csv``, ``groups.csv`` and PNG figures, and logs them as the artifacts of
a run tagged ``epsstar.role=report``.

What is computed, per configuration group (every TrainConfig field but ε, seed and init):

- Table 1 of the paper: per ε, the best epoch and the adversarial train/test loss and accuracy
  at that epoch (means ± std over seeds), from the runs' final ``best_*`` metrics;
- R*(0), the clean run's clean test loss at its best epoch (the mean when several clean runs);
- ε* from the from-scratch runs (:func:`~epsstar.estimate.interpolate_epsstar`, the clean run as
  the point (0, its training loss)), with a bootstrap interval when seeds repeat;
- ε* from adversarial fine-tuning of the clean checkpoint (runs with ``init=runs:/<clean run>``),
  per fine-tuning attack: all fine-tuned ε together, and one estimate per single ε;
- catastrophic overfitting of FGM training (SPEC §6): runs whose PGD test accuracy collapsed
  while their training accuracy stayed high, and the smallest such ("unstable") ε;
- the generalization-gap ratio (test_adv_loss − train_adv_loss) / train_adv_loss: at the best
  epoch for every run (from the final metrics), and per epoch for the runs whose learning curves
  are drawn, with its mean over the epochs after the learning-rate drop.

Cost: the tables come from ONE paginated ``search_runs`` (1,000 runs per request), whose runs
carry every metric's latest value — the final ``best_*`` metrics and the last epoch of each
per-epoch metric. Metric histories are fetched only for the (capped) learning-curve figures.
"""

from __future__ import annotations

import base64
import csv
import dataclasses
import html
import itertools
import math
import os
import re
import statistics
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import mlflow
from mlflow.entities import Param, ViewType
from mlflow.exceptions import MlflowException

from epsstar import tracking
from epsstar.config import ConfigError, EpsstarError, TrainConfig
from epsstar.estimate import Estimate, bootstrap_epsstar, extrapolate_epsstar, interpolate_epsstar

PAGE_SIZE = 1000  # runs per search request (MLflow's maximum for one page)
SKIPPED_ROLES = ("report", "simulate")  # epsstar runs that are not about training
# Fields that vary *inside* a group: the x-axis and the repetitions of one experiment.
PER_RUN_FIELDS = ("eps", "seed", "init")
LABEL_FIELDS = ("dataset", "arch", "width", "n_train", "norm", "attack", "steps", "step_size",
                "loss", "beta")  # shown in a group's label; other differences get a column
HISTORY_METRICS = ("train_adv_loss", "test_adv_loss", "train_adv_acc", "test_adv_acc", "lr")
# Catastrophic overfitting (SPEC §6): after FGM training the PGD test accuracy is ~0 (below
# COLLAPSED_ACC, or below COLLAPSED_FRACTION of the FGM training accuracy) while the training
# accuracy stays at least HIGH_TRAIN_ACC. Last-epoch values: early stopping can hide a collapse.
COLLAPSED_ACC = 0.05
COLLAPSED_FRACTION = 0.2
HIGH_TRAIN_ACC = 0.5
# A learning-rate "drop": the first epoch whose lr is at most this fraction of the peak before it
# (the piecewise schedule's /10; the triangular schedule's fall past half its peak).
LR_DROP_FRACTION = 0.5
BOOT_LEVEL = 0.9  # coverage of the bootstrap interval and of the fine-tuning Fieller interval


@dataclass(frozen=True)
class ReportConfig:
    """What ``epsstar report`` reads and writes."""

    tracking_uri: str | None = None  # None = MLFLOW_TRACKING_URI, else MLflow's default
    experiments: tuple[str, ...] = ()  # names; () = $MLFLOW_EXPERIMENT_NAME, else every one
    study: str | None = None  # only runs tagged epsstar.study = this
    parent: str | None = None  # only this run and its child runs
    out: Path = Path("epsstar-report")  # output directory
    max_curves: int = 20  # learning-curve figures at most (each costs history requests)
    log: bool = True  # log the outputs as a report run (False for read-only stores)
    n_boot: int = 1000  # bootstrap replicates of the from-scratch ε* (0 = no interval)

    def __post_init__(self) -> None:
        if self.max_curves < 0 or self.n_boot < 0:
            raise ConfigError("max_curves and n_boot must be >= 0")


# =============================================================================== reading
@dataclass(frozen=True)
class RunRecord:
    """One FINISHED epsstar run as the report sees it."""

    run_id: str
    experiment_id: str
    name: str
    role: str  # the epsstar.role tag
    start_time: int  # ms since the Unix epoch
    params: dict[str, str]
    # latest value of each metric: the final best_* metrics and the last epoch's per-epoch ones
    metrics: dict[str, float]
    tags: dict[str, str]
    cfg: TrainConfig | None  # None for a run that trained nothing (a search parent...)

    @classmethod
    def from_mlflow(cls, run: Any) -> RunRecord:
        tags = dict(run.data.tags)
        return cls(run.info.run_id, run.info.experiment_id, run.info.run_name or "",
                   tags.get(tracking.TAG_ROLE, ""), int(run.info.start_time or 0),
                   dict(run.data.params), dict(run.data.metrics), tags,
                   _training_config(run.data.params, run.data.metrics))

    def metric(self, name: str) -> float:
        return float(self.metrics.get(name, math.nan))

    @property
    def eps(self) -> float:
        """ε in pixel units (training runs only)."""
        return self.cfg.eps if self.cfg is not None else math.nan

    @property
    def kind(self) -> str:
        """clean | scratch | finetune for training runs (from the config), else the role tag."""
        return self.cfg.role if self.cfg is not None else self.role

    def gap_ratio(self) -> float:
        """(test_adv_loss − train_adv_loss) / train_adv_loss at the best epoch."""
        train = self.metric("best_train_adv_loss")
        test = self.metric("best_test_clean_loss" if self.eps == 0 else "best_test_adv_loss")
        return (test - train) / train if train > 0 else math.nan

    def last_accuracies(self) -> tuple[float, float]:
        """(train_adv_acc, PGD test_adv_acc) at the last epoch, else at the best epoch."""
        train = self.metrics.get("train_adv_acc", self.metric("best_train_adv_acc"))
        test = self.metrics.get("test_adv_acc", self.metric("best_test_adv_acc"))
        return float(train), float(test)


def _training_config(params: dict[str, str], metrics: dict[str, float]) -> TrainConfig | None:
    """The run's TrainConfig when it is a finished training run (has ε and R̂), else None."""
    if "eps" not in params or "best_train_adv_loss" not in metrics:
        return None
    try:
        return TrainConfig.from_params(params)
    except (ConfigError, TypeError, ValueError):  # params of an incompatible version
        return None


@dataclass(frozen=True)
class Selection:
    """The runs a report covers and where they came from."""

    uri: str
    experiments: dict[str, str]  # experiment id → name
    records: list[RunRecord]
    skipped: int  # FINISHED epsstar runs left out: no ε/R̂ and nothing to report either


def read_runs(client: mlflow.MlflowClient, cfg: ReportConfig) -> Selection:
    """Every FINISHED epsstar run that ``cfg`` selects, in one paginated search (plus one
    ``get_run`` per clean run that a selected fine-tune run starts from but the filter missed).

    Raises:
        ConfigError: unknown experiment or parent run.
        EpsstarError: nothing to report.
        tracking.TrackingError: the store cannot be reached.
    """
    uri = client.tracking_uri
    with _store_errors(uri, check_exists=False):
        experiments = _experiments(client, cfg.experiments)
        runs = _search_all(client, list(experiments), _filter(cfg))
        if cfg.parent:
            runs = [_get_run(client, cfg.parent, must_exist=True), *runs]
    records = [RunRecord.from_mlflow(r) for r in runs if r.info.status == "FINISHED"
               and r.data.tags.get(tracking.TAG_ROLE) not in SKIPPED_ROLES]
    with _store_errors(uri, check_exists=False):
        missing = _missing_clean_runs(client, records)
    records += [RunRecord.from_mlflow(r) for r in missing]
    kept = [r for r in records if r.cfg is not None or _logged_estimates(r)]
    if not any(r.cfg is not None for r in kept):
        raise EpsstarError(f"no FINISHED epsstar runs in {_where(uri, experiments, cfg)}")
    return Selection(uri, experiments, kept, len(records) - len(kept))


def _where(uri: str, experiments: dict[str, str], cfg: ReportConfig) -> str:
    names = ", ".join(repr(n) for n in experiments.values())
    where = f"experiment {names}" if len(experiments) == 1 else \
        f"experiments {names}" if cfg.experiments else f"tracking store {uri}"
    if cfg.study:
        where += f" with study {cfg.study!r}"
    if cfg.parent:
        where += f" under parent run {cfg.parent}"
    return where


def _filter(cfg: ReportConfig) -> str:
    clauses = ["attributes.status = 'FINISHED'", f"tags.`{tracking.TAG_ROLE}` LIKE '%'"]
    if cfg.study:
        clauses.append(f"tags.`{tracking.TAG_STUDY}` = '{_quote(cfg.study)}'")
    if cfg.parent:
        clauses.append(f"tags.`{tracking.TAG_PARENT}` = '{_quote(cfg.parent)}'")
    return " and ".join(clauses)


def _quote(value: str) -> str:
    return value.replace("'", "\\'")


def _experiments(client: mlflow.MlflowClient, names: Sequence[str]) -> dict[str, str]:
    """Experiment id → name: the named ones, else $MLFLOW_EXPERIMENT_ID/_NAME, else all."""
    env_name = os.environ.get("MLFLOW_EXPERIMENT_NAME")
    env_id = os.environ.get("MLFLOW_EXPERIMENT_ID")
    if not names and env_id:
        exp = client.get_experiment(env_id)
        return {exp.experiment_id: exp.name}
    names = names or ((env_name,) if env_name else ())
    if not names:
        return {e.experiment_id: e.name for e in _all_experiments(client)}
    found = {}
    for name in names:
        exp = client.get_experiment_by_name(name)
        if exp is None:
            raise ConfigError(f"no experiment named {name!r} in tracking store "
                              f"{client.tracking_uri}")
        found[exp.experiment_id] = exp.name
    return found


def _all_experiments(client: mlflow.MlflowClient) -> Iterator[Any]:
    token = None
    while True:
        page = client.search_experiments(ViewType.ACTIVE_ONLY, max_results=PAGE_SIZE,
                                         page_token=token)
        yield from page
        token = page.token
        if not token:
            return


def _search_all(client: mlflow.MlflowClient, experiment_ids: list[str],
                filter_string: str) -> list[Any]:
    """Every matching run, ``PAGE_SIZE`` per request, newest first."""
    runs: list[Any] = []
    token = None
    while experiment_ids:
        page = client.search_runs(experiment_ids, filter_string, ViewType.ACTIVE_ONLY,
                                  max_results=PAGE_SIZE, page_token=token,
                                  order_by=["attributes.start_time DESC"])
        runs.extend(page)
        token = page.token
        if not token:
            break
    return runs


def _get_run(client: mlflow.MlflowClient, run_id: str, *, must_exist: bool) -> Any | None:
    try:
        return client.get_run(run_id)
    except MlflowException as err:
        if err.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        if must_exist:
            raise ConfigError(f"no run {run_id} in tracking store {client.tracking_uri}") \
                from None
        return None


def _missing_clean_runs(client: mlflow.MlflowClient, records: list[RunRecord]) -> list[Any]:
    """The FINISHED clean runs that the selected runs need but the filter left out: the clean
    run a fine-tune starts from, the one a search parent names (``clean_run_id``: an identical
    clean run is reused across searches, so it carries the study tag of the first search only).
    Without them there is no R*(0)."""
    have = {r.run_id for r in records}
    wanted = {_runs_uri_id(r.cfg.init) for r in records if r.kind == "finetune"}
    wanted |= {r.params.get("clean_run_id") for r in records if r.cfg is None}
    wanted -= have | {None, ""}
    found = (_get_run(client, run_id, must_exist=False) for run_id in sorted(wanted))
    return [r for r in found if r is not None and r.info.status == "FINISHED"]


def open_client(uri: str | None) -> mlflow.MlflowClient:
    """A client for ``uri`` (None: MLFLOW_TRACKING_URI, else MLflow's default) that has checked
    the store exists: a report never creates one (MLflow would make an empty sqlite file at a
    mistyped path, and the report would say "no runs" instead of "no such store")."""
    uri = uri or mlflow.get_tracking_uri()
    with _store_errors(uri):
        return mlflow.MlflowClient(tracking_uri=uri)


@contextmanager
def _store_errors(uri: str, *, check_exists: bool = True) -> Iterator[None]:
    """Fail in seconds on a wrong URI and turn store failures into one-line TrackingErrors."""
    if check_exists:
        _check_local_store(uri)
    try:
        with tracking.fail_fast():
            yield
    except EpsstarError:
        raise
    except MlflowException as err:
        if str(err).startswith("API request to"):  # MLflow's wrapping of a connection error
            raise tracking.TrackingError(f"cannot reach tracking store {uri}: {_reason(err)}") \
                from None
        raise tracking.TrackingError(f"tracking store {uri}: {tracking.short_error(err)}") from None
    except Exception as err:  # connection refused, DNS, unknown scheme: many types
        raise tracking.TrackingError(f"cannot reach tracking store {uri}: {_reason(err)}") \
            from None


def _reason(err: BaseException) -> str:
    """The OS-level reason buried in a connection error ("[Errno 111] Connection refused")."""
    found = re.search(r"\[Errno -?\d+\] [^'\")]+", str(err))
    return found.group(0) if found else tracking.short_error(err)


def _check_local_store(uri: str) -> None:
    parsed = urlparse(uri)
    if parsed.scheme == "sqlite":
        path = uri.split(":///", 1)[1] if ":///" in uri else ""
    elif parsed.scheme in ("", "file"):
        path = parsed.path
    else:
        return
    if path and path != ":memory:" and not Path(path).exists():
        raise tracking.TrackingError(f"tracking store {uri} does not exist")


# =============================================================================== grouping
Key = tuple[tuple[str, Any], ...]


@dataclass
class Group:
    """The runs of one configuration: the clean run(s), from-scratch runs at several ε (and
    seeds), fine-tunes of the clean run, and parent runs that logged their own estimates."""

    key: Key
    clean_key: Key  # the key of the clean runs that serve the group (see group_runs)
    clean: list[RunRecord] = field(default_factory=list)
    scratch: list[RunRecord] = field(default_factory=list)
    finetune: list[RunRecord] = field(default_factory=list)
    summaries: list[RunRecord] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def config(self) -> dict[str, Any]:
        """The configuration every run of the group shares (the clean run's, in a clean-only
        group)."""
        return dict(self.key)

    @property
    def runs(self) -> list[RunRecord]:
        return [*self.clean, *self.scratch, *self.finetune]

    @property
    def experiment_id(self) -> str:
        return (self.clean or self.runs)[0].experiment_id

    def sort_key(self) -> tuple:
        c = self.config
        return (str(c.get("dataset")), str(c.get("arch")), c.get("width", 0), c.get("n_train", 0),
                str(c.get("norm")), not self.scratch, c.get("attack") != "pgd",
                str(c.get("loss")), repr(self.key))


def _key(cfg: TrainConfig) -> Key:
    """What the runs of one group share: the run's identity but ε, seed and init."""
    return tuple(sorted((k, v) for k, v in cfg.identity().items() if k not in PER_RUN_FIELDS))


def _clean_key(cfg: TrainConfig) -> Key:
    """The key of the clean runs that serve ``cfg``: its clean counterpart's, whose identity
    drops every attack and objective field (TrainConfig.identity), so one clean run is the
    ε = 0 point and R*(0) of every norm/attack/objective of its configuration. It is one
    shared run, never an average over runs of different norms."""
    return _key(cfg.replace(eps=0.0, init="scratch"))


def group_runs(records: Iterable[RunRecord]) -> list[Group]:
    """Group training runs by configuration: from-scratch runs by their key, each group with the
    clean runs of its clean key. A fine-tune joins the from-scratch group of its clean run, norm
    and objective, else a fine-tuning group of those. A parent run with logged estimates joins
    the group of its first child. Nothing is averaged across groups: runs that differ in norm,
    dataset, model... are always reported apart."""
    records = list(records)
    groups: dict[Key, Group] = {}
    for r in records:
        if r.kind == "scratch":
            groups.setdefault(_key(r.cfg), Group(_key(r.cfg), _clean_key(r.cfg))).scratch.append(r)
    clean = {r.run_id: r for r in records if r.kind == "clean"}
    for r in records:
        if r.kind == "finetune":
            _add_finetune(r, groups, clean)
    _add_clean_runs(list(clean.values()), groups)
    ordered = sorted(groups.values(), key=Group.sort_key)
    # a run held by several groups (a shared clean run) belongs to the first, in report order
    where = {r.run_id: g for g in reversed(ordered) for r in g.runs}
    for r in records:
        if r.cfg is None and _logged_estimates(r):
            _add_summary(r, where, records)
    return ordered


def _add_finetune(run: RunRecord, groups: dict[Key, Group], clean: dict[str, RunRecord]) -> None:
    source = _clean_run_of(run.cfg.init, clean)
    flavour = (("norm", run.cfg.norm), ("loss", run.cfg.loss))
    clean_key = _key(clean[source].cfg) if source is not None else _clean_key(run.cfg)
    if source is not None:
        for group in sorted(groups.values(), key=Group.sort_key):
            if group.scratch and group.clean_key == clean_key and \
                    (("norm", group.config["norm"]), ("loss", group.config["loss"])) == flavour:
                group.finetune.append(run)
                return
    key = (*clean_key, *flavour, *((("init", run.cfg.init),) if source is None else ()))
    group = groups.setdefault(key, Group(key, clean_key))
    if source is None and not group.finetune:
        group.notes.append(f"fine-tunes of {run.cfg.init}: that clean run is not in the store "
                           "(or not FINISHED), so there is no fine-tuning estimate")
    group.finetune.append(run)


def _add_clean_runs(clean: list[RunRecord], groups: dict[Key, Group]) -> None:
    """Give every group the clean runs of its clean key (several: seeds); clean runs that no
    group takes form a clean-only group."""
    by_key: dict[Key, list[RunRecord]] = {}
    for r in clean:
        by_key.setdefault(_key(r.cfg), []).append(r)
    for group in groups.values():
        group.clean = list(by_key.get(group.clean_key, []))
    for key, runs in by_key.items():
        if not any(g.clean_key == key for g in groups.values()):
            groups[key] = Group(key, key, clean=list(runs))


def _runs_uri_id(init: str) -> str | None:
    """The run id of ``runs:/<run_id>[/path]``, else None."""
    if not init.startswith("runs:/"):
        return None
    return init[len("runs:/"):].strip("/").split("/")[0] or None


def _clean_run_of(init: str, clean_ids: Iterable[str]) -> str | None:
    """The clean run a fine-tune starts from: ``runs:/<id>``, or a checkpoint path that runs
    through a run's checkpoint directory (``checkpoints/<run_id>/best.pt``)."""
    clean_ids = set(clean_ids)
    run_id = _runs_uri_id(init)
    if run_id is not None:
        return run_id if run_id in clean_ids else None
    return next((part for part in Path(init).parts if part in clean_ids), None)


def _add_summary(run: RunRecord, where: dict[str, Group], records: list[RunRecord]) -> None:
    """A parent run that logged its own ε* joins the group of its first child (or of the clean
    run it names)."""
    children = [r.run_id for r in records if r.tags.get(tracking.TAG_PARENT) == run.run_id]
    named = run.params.get("clean_run_id", "")
    group = next((where[c] for c in [*children, named] if c in where), None)
    if group is not None:
        group.summaries.append(run)


def _logged_estimates(run: RunRecord) -> dict[str, float]:
    """What a non-training (search, fine-tune search) run logged about ε*, ε in /255: its
    ``epsstar*_255`` metrics, its other ``epsstar*`` metrics converted, and R*(0)."""
    if run.cfg is not None:
        return {}
    found = {}
    for k, v in sorted(run.metrics.items()):
        if k in ("threshold", "clean_train_loss", "time_saved_fraction") or k.endswith("_255"):
            found[k] = v
        elif k.startswith("epsstar") and f"{k}_255" not in run.metrics:
            found[f"{k}_255"] = v * 255
    return found


# =============================================================================== analysis
@dataclass(frozen=True)
class EpsRow:
    """One line of Table 1: the runs of one kind at one ε, read at their best epochs."""

    kind: str  # clean | scratch | "<attack> fine-tune"
    eps: float  # pixel units
    runs: tuple[RunRecord, ...]
    unstable: int  # how many of them overfitted catastrophically

    def values(self, metric: str) -> list[float]:
        name = _CLEAN_METRIC.get(metric, metric) if self.eps == 0 else metric
        return [r.metric(name) for r in self.runs]

    def gap_ratios(self) -> list[float]:
        return [r.gap_ratio() for r in self.runs]


# at ε = 0 the adversarial test set is the clean one: R*(0) is defined on the clean metric
_CLEAN_METRIC = {"best_test_adv_loss": "best_test_clean_loss",
                 "best_test_adv_acc": "best_test_clean_acc"}


@dataclass(frozen=True)
class FinetuneEstimate:
    """ε* extrapolated from fine-tunes of one clean run with one attack (SPEC §5)."""

    clean_run_id: str
    attack: str  # the fine-tuning attack: pgd | fgm
    eps: tuple[float, ...]  # the fine-tuned ε used (pixel units); one value = a 1-point estimate
    estimate: Estimate


@dataclass(frozen=True)
class GroupReport:
    """Everything the report says about one group."""

    group: Group
    slug: str  # file-name-safe id, e.g. g01-digits-mlp-linf-pgd
    label: str
    threshold: float | None  # R*(0); None without a clean run
    clean_train_loss: float | None
    scratch: Estimate | None  # ε* from the from-scratch runs
    interval: tuple[float, float] | None  # bootstrap interval of ``scratch`` (pixel units)
    finetune: tuple[FinetuneEstimate, ...]
    rows: tuple[EpsRow, ...]  # clean and from-scratch runs, by ε
    finetune_rows: tuple[EpsRow, ...]
    unstable: frozenset[str]  # run ids of catastrophically overfitted FGM runs
    unstable_eps: float | None  # the smallest such ε (pixel units)
    notes: tuple[str, ...]


def analyze_group(group: Group, index: int, *, n_boot: int = 1000) -> GroupReport:
    """The numbers of one group (pure: no tracking store access)."""
    notes = list(group.notes)
    threshold, clean_loss = _clean_point(group, notes)
    unstable = frozenset(r.run_id for r in group.scratch if is_unstable(r))
    scratch, interval = _scratch_estimate(group, threshold, n_boot, notes)
    finetune = tuple(_finetune_estimates(group, notes)) if threshold is not None else ()
    unstable_eps = min((r.eps for r in group.scratch if r.run_id in unstable), default=None)
    return GroupReport(
        group, _slug(group, index), group_label(group), threshold, clean_loss, scratch,
        interval, finetune, tuple(_rows([*group.clean, *group.scratch], unstable)),
        tuple(_rows(group.finetune, unstable)), unstable, unstable_eps, tuple(notes))


def _clean_point(group: Group, notes: list[str]) -> tuple[float | None, float | None]:
    """(R*(0), clean training loss): means over the clean runs (seeds) of the group."""
    if not group.clean:
        notes.append("no clean run: R*(0) and eps* are not computed for this group")
        return None, None
    if len(group.clean) > 1:
        notes.append(f"{len(group.clean)} clean runs: R*(0) and the clean training loss are "
                     "their means")
    return (statistics.fmean(r.metric("best_test_clean_loss") for r in group.clean),
            statistics.fmean(r.metric("best_train_adv_loss") for r in group.clean))


def _scratch_estimate(group: Group, threshold: float | None, n_boot: int,
                      notes: list[str]) -> tuple[Estimate | None, tuple[float, float] | None]:
    """Interpolated ε* over the clean (ε = 0) and from-scratch runs; each seed is one point, so
    repeated ε are averaged by the estimator and resampled by the bootstrap."""
    if threshold is None:
        return None, None
    if not group.scratch:
        notes.append("no adversarial from-scratch runs: no interpolated eps*")
        return None, None
    runs = [*group.clean, *group.scratch]
    eps = [r.eps for r in runs]
    losses = [r.metric("best_train_adv_loss") for r in runs]
    estimate = interpolate_epsstar(eps, losses, threshold)
    if estimate.isotonic:
        notes.append("the loss-vs-eps curve is not monotone (seed noise?): eps* is read from "
                     "its isotonic (non-decreasing) fit")
    repeated = len(set(eps)) < len(eps)
    interval = bootstrap_epsstar(eps, losses, threshold, n_boot=n_boot, level=BOOT_LEVEL) \
        if repeated and n_boot > 0 else None
    return estimate, interval


def _finetune_estimates(group: Group, notes: list[str]) -> Iterator[FinetuneEstimate]:
    """Per (clean run, attack): all fine-tuned ε together, then each ε alone (1-point)."""
    clean = {r.run_id: r for r in group.clean}
    by_source: dict[tuple[str, str], list[RunRecord]] = {}
    for r in group.finetune:
        source = _clean_run_of(r.cfg.init, clean)
        if source is None:
            continue
        by_source.setdefault((source, r.cfg.attack), []).append(r)
    for (source, attack), runs in sorted(by_source.items()):
        base = clean[source]
        threshold = base.metric("best_test_clean_loss")
        clean_loss = base.metric("best_train_adv_loss")
        eps_values = sorted({r.eps for r in runs})
        subsets = ([eps_values] if len(eps_values) > 1 else []) + [[e] for e in eps_values]
        for subset in subsets:
            chosen = [r for r in runs if r.eps in subset]
            estimate = extrapolate_epsstar([r.eps for r in chosen],
                                           [r.metric("best_train_adv_loss") for r in chosen],
                                           clean_loss, threshold, level=BOOT_LEVEL)
            yield FinetuneEstimate(source, attack, tuple(subset), estimate)
    if len(clean) > 1 and by_source:
        notes.append("fine-tune estimates use the R*(0) of the clean run they start from")


def compare_with_unstable(groups: Sequence[GroupReport]) -> list[GroupReport]:
    """SPEC §6: ε* lies below the unstable ε of FGM training. Add a note saying whether it does
    to each FGM group with an unstable ε and a PGD sibling group (same configuration otherwise)
    that has a proper ε*."""
    out = []
    for g in groups:
        sibling = next((s for s in groups if s.group.scratch and s.scratch is not None
                        and s.scratch.bound is None and s.group.config.get("attack") == "pgd"
                        and s.group.clean_key == g.group.clean_key
                        and s.group.config.get("norm") == g.group.config.get("norm")
                        and s.group.config.get("loss") == g.group.config.get("loss")), None)
        if g.unstable_eps is None or sibling is None:
            out.append(g)
            continue
        below = sibling.scratch.epsstar < g.unstable_eps
        note = (f"eps* of the PGD group {sibling.slug} ({fmt255(sibling.scratch.epsstar)}/255) "
                f"is {'below' if below else 'NOT below'} the unstable eps "
                f"{fmt255(g.unstable_eps)}/255 "
                f"({'as in' if below else 'unlike'} the paper, where it is always below)")
        out.append(dataclasses.replace(g, notes=(*g.notes, note)))
    return out


def is_unstable(run: RunRecord) -> bool:
    """Catastrophic overfitting of an FGM-trained run (thresholds at the top of the module)."""
    if run.cfg is None or run.cfg.attack != "fgm" or run.eps == 0:
        return False
    train_acc, test_acc = run.last_accuracies()
    collapsed = test_acc < COLLAPSED_ACC or test_acc < COLLAPSED_FRACTION * train_acc
    return train_acc >= HIGH_TRAIN_ACC and collapsed


def _rows(runs: Sequence[RunRecord], unstable: frozenset[str]) -> Iterator[EpsRow]:
    by: dict[tuple[str, float], list[RunRecord]] = {}
    for r in runs:
        kind = f"{r.cfg.attack} fine-tune" if r.kind == "finetune" else r.kind
        by.setdefault((kind, r.eps), []).append(r)
    for (kind, eps), chosen in sorted(by.items(), key=lambda item: item[0]):
        yield EpsRow(kind, eps, tuple(chosen), sum(r.run_id in unstable for r in chosen))


def group_label(group: Group) -> str:
    """A one-line name of a group: dataset, model, n, then norm, attack and objective."""
    c = group.config
    parts = [str(c["dataset"]), f"{c['arch']}-{c['width']}", f"n={c['n_train'] or 'all'}"]
    beta = f"(beta={c['beta']:g})" if c.get("loss", "at") != "at" else ""
    if group.scratch:
        steps = f"-{c['steps']}" if c["attack"] == "pgd" else ""
        parts += [str(c["norm"]), f"{c['attack']}{steps}", f"{c['loss']}{beta}"]
    elif group.finetune:
        missing = ", clean run missing" if "init" in c else ""
        parts += [str(c["norm"]), f"{c['loss']}{beta}", f"fine-tuning only{missing}"]
    else:
        parts.append("clean only")
    return " · ".join(parts)


def _slug(group: Group, index: int) -> str:
    c = group.config
    what = f"{c['norm']}-{c['attack']}" if group.scratch else \
        f"{c['norm']}-finetune" if group.finetune else "clean"
    text = f"g{index:02d}-{c['dataset']}-{c['arch']}-{what}"
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text)


def differing_fields(groups: Sequence[GroupReport]) -> dict[str, str]:
    """Per group slug, the settings outside its label that differ between groups (lr, epochs...)."""
    keys = sorted({k for g in groups for k in g.group.config} - set(LABEL_FIELDS) - {"init"})
    varying = [k for k in keys if len({repr(g.group.config.get(k)) for g in groups}) > 1]
    return {g.slug: ", ".join(f"{k}={g.group.config.get(k)}" for k in varying) for g in groups}


# =============================================================================== histories
@dataclass(frozen=True)
class Curve:
    """One run's per-epoch history and the generalization-gap ratio derived from it."""

    run: RunRecord
    group: GroupReport
    series: dict[str, list[tuple[int, float]]]  # metric → (epoch, value), epochs ascending

    def gap(self) -> list[tuple[int, float]]:
        """(epoch, (test_adv_loss − train_adv_loss) / train_adv_loss)."""
        train = dict(self.series.get("train_adv_loss", []))
        test = dict(self.series.get("test_adv_loss", []))
        return [(e, (test[e] - train[e]) / train[e]) for e in sorted(train.keys() & test.keys())
                if train[e] > 0]

    def lr_drop_epoch(self) -> int | None:
        """The first epoch whose lr is ≤ LR_DROP_FRACTION × the largest lr before it."""
        peak = -math.inf
        for epoch, lr in self.series.get("lr", []):
            if peak > 0 and lr <= LR_DROP_FRACTION * peak:
                return epoch
            peak = max(peak, lr)
        return None

    def gap_after_drop(self) -> float:
        """The mean gap ratio over the epochs from the lr drop on (NaN without a drop)."""
        drop = self.lr_drop_epoch()
        after = [g for e, g in self.gap() if drop is not None and e >= drop]
        return statistics.fmean(after) if after else math.nan


def curve_candidates(groups: Sequence[GroupReport]) -> Iterator[tuple[RunRecord, GroupReport]]:
    """Runs in the order their learning curves are worth drawing: the groups take turns; within
    a group see :func:`_by_relevance`. A clean run shared by several groups comes once."""
    queues = [deque(_by_relevance(g)) for g in groups]
    seen: set[str] = set()
    while any(queues):
        for group, queue in zip(groups, queues, strict=True):
            while queue and queue[0].run_id in seen:
                queue.popleft()
            if queue:
                run = queue.popleft()
                seen.add(run.run_id)
                yield run, group


def _by_relevance(report: GroupReport) -> list[RunRecord]:
    """The newest clean run, the catastrophic FGM failures, the from-scratch runs nearest ε*
    (in log ε), the fine-tunes, the other clean runs; newest first among equals."""
    target = report.scratch.epsstar if report.scratch is not None else math.nan
    newest = sorted(report.group.runs, key=lambda r: -r.start_time)
    first_clean = next((r for r in newest if r.kind == "clean"), None)

    def rank(r: RunRecord) -> tuple[int, float]:
        if r is first_clean:
            return 0, 0.0
        if r.run_id in report.unstable:
            return 1, 0.0
        if r.kind == "scratch":
            near = abs(math.log(r.eps / target)) if target > 0 else r.eps
            return 2, near
        return (3, r.eps) if r.kind == "finetune" else (4, 0.0)

    return sorted(newest, key=rank)  # stable: newest first among equal ranks


def fetch_histories(client: mlflow.MlflowClient,
                    candidates: Iterable[tuple[RunRecord, GroupReport]], limit: int) -> list[Curve]:
    """Per-epoch histories of the first ``limit`` candidates that have one. A probe request
    (train_adv_loss) first, then one request per other metric; at most 3·``limit`` probes, so a
    store of runs logged without histories costs no more than that."""
    curves: list[Curve] = []
    with _store_errors(client.tracking_uri, check_exists=False):
        for run, group in itertools.islice(candidates, 3 * limit):
            if len(curves) == limit:
                break
            probe = _history(client, run.run_id, HISTORY_METRICS[0])
            if not probe:
                continue
            series = {HISTORY_METRICS[0]: probe}
            series.update({name: _history(client, run.run_id, name)
                           for name in HISTORY_METRICS[1:]})
            curves.append(Curve(run, group, series))
    return curves


def _history(client: mlflow.MlflowClient, run_id: str, name: str) -> list[tuple[int, float]]:
    """(epoch, value) pairs, epochs ascending; step 0 is not an epoch (final metrics use it)."""
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, name)
                  if m.step >= 1)


# =============================================================================== documents
# A report is a list of blocks, each rendered by the markdown and the HTML renderer registries.
@dataclass(frozen=True)
class Block:
    kind: str  # h1 | h2 | h3 | p | ul | table | img
    text: str = ""
    items: tuple[Any, ...] = ()  # ul: strings; table: (header row, *rows); img: unused
    path: str = ""  # img: path relative to the output directory


def _table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> Block:
    return Block("table", items=(tuple(header), *(tuple(str(c) for c in r) for r in rows)))


def fmt(value: float | None, digits: int = 4) -> str:
    """``digits`` decimals (scientific notation for very small or large values); — for none."""
    if value is None or not math.isfinite(value):
        return "—"
    if digits and value != 0 and not 1e-3 <= abs(value) < 1e4:
        return f"{value:.{digits}g}"
    return f"{value:.{digits}f}"


def fmt255(eps: float | None) -> str:
    """ε (pixel units) as /255 with 3 significant digits."""
    if eps == math.inf:
        return "∞"
    return "—" if eps is None or not math.isfinite(eps) else f"{eps * 255:.3g}"


def _mean_sd(values: list[float], digits: int = 4) -> str:
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return "—"
    if len(finite) == 1:
        return fmt(finite[0], digits)
    return f"{fmt(statistics.fmean(finite), digits)} ± {fmt(statistics.stdev(finite), digits)}"


def describe_estimate(estimate: Estimate | None, what: str = "") -> str:
    """ε* in /255 with its bracket (interpolation) or Fieller interval (extrapolation);
    ``what`` (e.g. "3-point") joins the remarks in parentheses."""
    if estimate is None:
        return "—"
    e = estimate
    remarks = [what] if what else []
    if e.bound == "above":
        text = f"> {fmt255(e.lower)}/255"
    elif e.bound == "below":
        text = f"< {fmt255(e.upper)}/255"
    else:
        text = f"{fmt255(e.epsstar)}/255"
        if e.method == "interpolation":
            text += f" [{fmt255(e.lower)}, {fmt255(e.upper)}]"
        elif e.lower != e.upper:
            remarks.append(f"{BOOT_LEVEL:.0%} CI {fmt255(e.lower)}–{fmt255(e.upper)}")
    if e.isotonic:
        remarks.append("isotonic fit")
    return text + (f" ({', '.join(remarks)})" if remarks else "")


def headline_finetune(report: GroupReport, attack: str) -> FinetuneEstimate | None:
    """The fine-tuning estimate of ``attack`` to quote: all ε together, else the first 1-point."""
    ests = [f for f in report.finetune if f.attack == attack]
    return next((f for f in ests if len(f.eps) > 1), ests[0] if ests else None)


def _finetune_summary(report: GroupReport, attack: str) -> str:
    best = headline_finetune(report, attack)
    if best is None:
        return "—"
    return describe_estimate(best.estimate, _points_label(best))


def _points_label(f: FinetuneEstimate) -> str:
    if len(f.eps) == 1:
        return f"1-point, eps={fmt255(f.eps[0])}"
    return f"{len(f.eps)}-point"


def summary_blocks(sel: Selection, groups: Sequence[GroupReport], curves: Sequence[Curve],
                   generated: str) -> list[Block]:
    runs = sum(r.cfg is not None for r in sel.records)
    blocks = [
        Block("h1", "epsstar report: the phase transition from clean to adversarial training"),
        Block("ul", items=(
            f"tracking store: `{sel.uri}`",
            f"experiments: {', '.join(sorted(sel.experiments.values()))}",
            f"{runs} FINISHED training runs in {len(groups)} configuration groups; "
            f"generated {generated}",
        )),
        Block("p", "R*(0) is the clean run's clean test loss at its best epoch; eps* is where the "
                   "adversarial training loss at the best epoch, R̂(θ̂(eps), eps), crosses R*(0). "
                   "eps are in /255 (pixel scale × 255). Brackets [a, b] are the tried eps that "
                   "bracket the crossing; the bootstrap interval resamples seeds. Gap ratio = "
                   "(adversarial test loss − adversarial training loss) / adversarial training "
                   "loss."),
    ]
    if sel.skipped:
        blocks.append(Block("p", f"{sel.skipped} FINISHED epsstar runs carry neither a training "
                                 "configuration nor an estimate and are not reported."))
    blocks.append(_summary_table(groups))
    for g in groups:
        blocks += group_blocks(g, [c for c in curves if c.group is g])
    return blocks


def _summary_table(groups: Sequence[GroupReport]) -> Block:
    """One row per group; the "other settings" column only when settings outside the labels
    (lr, epochs...) differ between groups."""
    diffs = differing_fields(groups)
    other = any(diffs.values())
    header = ["group", "configuration", *(["other settings"] if other else []), "runs", "R*(0)",
              "eps* (scratch)", f"bootstrap {BOOT_LEVEL:.0%}", "fine-tune PGD", "fine-tune FGM",
              "FGM unstable from"]
    rows = [[g.slug, g.label, *([diffs[g.slug] or "—"] if other else []), len(g.group.runs),
             fmt(g.threshold), describe_estimate(g.scratch), _interval(g.interval),
             _finetune_summary(g, "pgd"), _finetune_summary(g, "fgm"), _unstable_text(g)]
            for g in groups]
    return _table(header, rows)


def _interval(interval: tuple[float, float] | None) -> str:
    return "—" if interval is None else f"[{fmt255(interval[0])}, {fmt255(interval[1])}]"


def _unstable_text(g: GroupReport) -> str:
    return "—" if g.unstable_eps is None else f"{fmt255(g.unstable_eps)}/255"


def group_blocks(g: GroupReport, curves: Sequence[Curve]) -> list[Block]:
    c = g.group.config
    blocks = [Block("h2", f"{g.slug}: {g.label}"),
              Block("p", "configuration: " + ", ".join(f"{k}={v}" for k, v in sorted(c.items()))),
              Block("ul", items=_findings(g))]
    if g.notes:
        blocks.append(Block("ul", items=tuple(f"note: {n}" for n in g.notes)))
    blocks += [Block("h3", "Adversarial training at each eps (Table 1)"),
               _table(TABLE1_HEADER, [_table1_row(r) for r in g.rows])]
    if g.finetune_rows:
        blocks += [Block("h3", "Adversarial fine-tuning of the clean model (SPEC §5)"),
                   _table(TABLE1_HEADER, [_table1_row(r) for r in g.finetune_rows]),
                   _table(["clean run", "attack", "points", "eps*"],
                          [[f.clean_run_id, f.attack, _points_label(f),
                            describe_estimate(f.estimate)] for f in g.finetune])]
    if g.threshold is not None:
        blocks.append(Block("img", f"loss vs eps, {g.slug}", path=_loss_plot_path(g)))
    if curves:
        blocks += [Block("h3", "Learning curves"), _table(
            ["run", "kind", "eps", "best epoch", "gap ratio at best epoch",
             "mean gap ratio after lr drop"],
            [[c.run.run_id, c.run.kind, fmt255(c.run.eps), fmt(c.run.metric("best_epoch"), 0),
              fmt(c.run.gap_ratio(), 3), fmt(c.gap_after_drop(), 3)] for c in curves])]
        blocks += [Block("img", f"learning curves {c.run.run_id}", path=_curve_path(c))
                   for c in curves]
    return blocks


TABLE1_HEADER = ["kind", "eps (/255)", "runs", "best epoch", "adv train loss", "adv train acc",
                 "adv test loss", "adv test acc", "gap ratio", "FGM unstable"]


def _table1_row(row: EpsRow) -> list[str]:
    return [row.kind, fmt255(row.eps), str(len(row.runs)),
            _mean_sd(row.values("best_epoch"), 0), _mean_sd(row.values("best_train_adv_loss")),
            _mean_sd(row.values("best_train_adv_acc")), _mean_sd(row.values("best_test_adv_loss")),
            _mean_sd(row.values("best_test_adv_acc")), _mean_sd(row.gap_ratios(), 3),
            f"{row.unstable}/{len(row.runs)}" if row.unstable else ""]


def _findings(g: GroupReport) -> tuple[str, ...]:
    lines = [f"R*(0) = {fmt(g.threshold)} (clean test loss); clean training loss "
             f"{fmt(g.clean_train_loss)}"] if g.threshold is not None else []
    if g.scratch is not None:
        lines.append(f"eps* from scratch runs: {describe_estimate(g.scratch)}"
                     + (f", bootstrap {BOOT_LEVEL:.0%} interval {_interval(g.interval)}/255"
                        if g.interval else ""))
    lines += [f"eps* from {f.attack.upper()} fine-tuning: "
              f"{describe_estimate(f.estimate, _points_label(f))}" for f in g.finetune]
    if g.unstable_eps is not None:
        lines.append(f"FGM catastrophic overfitting (PGD test acc collapsed, train acc high) "
                     f"from eps = {fmt255(g.unstable_eps)}/255: the unstable eps")
    lines += [f"logged by {s.role} run {s.run_id}: " + ", ".join(
        f"{k}={fmt(v)}" for k, v in _logged_estimates(s).items()) for s in g.group.summaries]
    return tuple(lines)


def _loss_plot_path(g: GroupReport) -> str:
    return f"plots/{g.slug}-loss_vs_eps.png"


def _curve_path(curve: Curve) -> str:
    return f"plots/{curve.group.slug}-curve-{curve.run.run_id}.png"


# --------------------------------------------------------------------------- renderers
def _md_table(block: Block) -> str:
    header, *rows = block.items
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(c.replace("|", "\\|") for c in r) + " |"
                              for r in rows])


MARKDOWN: dict[str, Callable[[Block], str]] = {
    "h1": lambda b: f"# {b.text}",
    "h2": lambda b: f"## {b.text}",
    "h3": lambda b: f"### {b.text}",
    "p": lambda b: b.text,
    "ul": lambda b: "\n".join(f"- {item}" for item in b.items),
    "table": _md_table,
    "img": lambda b: f"![{b.text}]({b.path})",
}


def render_markdown(blocks: Sequence[Block]) -> str:
    return "\n\n".join(MARKDOWN[b.kind](b) for b in blocks) + "\n"


def _inline(text: str) -> str:
    """Escape, then render markdown's `code` spans."""
    return re.sub(r"`([^`]*)`", r"<code>\1</code>", html.escape(text))


# a cell that holds a number ("0.44 ± 0.01"), an estimate ("3.33/255 [2, 8]", "> 8/255"), an
# interval ("[2.27, 2.43]") or nothing ("—"); not a hex run id that happens to start with a digit
_NUMERIC = re.compile(r"([<>] )?\[?[-+]?(\d+(\.\d*)?(e[-+]?\d+)?|—|∞)(/255)?([ ,±\[(].*)?")


def _html_cell(text: str) -> str:
    """Numbers right-aligned; short ones ("3.33/255 [2, 8]") never broken across lines."""
    numeric = ' class="num"' if _NUMERIC.fullmatch(text) else ""
    if numeric and len(text) <= 24:
        numeric = ' class="num nowrap"'
    return f"<td{numeric}>{_inline(text)}</td>"


def _html_table(block: Block) -> str:
    header, *rows = block.items
    head = "".join(f"<th>{_inline(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(_html_cell(c) for c in r) + "</tr>" for r in rows)
    return (f'<div class="scroll"><table><thead><tr>{head}</tr></thead><tbody>{body}</tbody>'
            "</table></div>")


def _html_img(block: Block, root: Path) -> str:
    data = base64.b64encode((root / block.path).read_bytes()).decode("ascii")
    return f'<img alt="{html.escape(block.text)}" src="data:image/png;base64,{data}">'


HTML: dict[str, Callable[[Block, Path], str]] = {
    "h1": lambda b, _: f"<h1>{_inline(b.text)}</h1>",
    "h2": lambda b, _: f"<h2>{_inline(b.text)}</h2>",
    "h3": lambda b, _: f"<h3>{_inline(b.text)}</h3>",
    "p": lambda b, _: f"<p>{_inline(b.text)}</p>",
    "ul": lambda b, _: "<ul>" + "".join(f"<li>{_inline(i)}</li>" for i in b.items) + "</ul>",
    "table": lambda b, _: _html_table(b),
    "img": _html_img,
}

CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2em auto;
       max-width: 1200px; padding: 0 1em; color: #222; line-height: 1.4; }
h1 { font-size: 1.5em; } h2 { margin-top: 2em; border-bottom: 1px solid #ccc; }
table { border-collapse: collapse; margin: 0.8em 0; font-size: 0.85em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: left; }
th { background: #f2f2f2; } td.num { text-align: right; } td.nowrap { white-space: nowrap; }
td:first-child { white-space: nowrap; }
.scroll { overflow-x: auto; }
tbody tr:nth-child(even) { background: #fafafa; }
code { background: #f2f2f2; padding: 0 0.2em; }
img { max-width: 100%; display: block; margin: 0.5em 0; }
"""


def render_html(blocks: Sequence[Block], root: Path) -> str:
    """A self-contained page: inline CSS, figures embedded as base64 PNG data URIs."""
    body = "\n".join(HTML[b.kind](b, root) for b in blocks)
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f"<title>epsstar report</title><style>{CSS}</style></head>\n<body>\n{body}\n"
            "</body></html>\n")


# =============================================================================== files
RUN_COLUMNS = ("run_id", "experiment_id", "run_name", "role", "group", "start_time", "eps_255",
               "gap_ratio", "fgm_unstable")


def write_runs_csv(path: Path, sel: Selection, groups: Sequence[GroupReport]) -> None:
    """One row per run read: identity, derived columns, then ``params.*`` and ``metrics.*``
    (the latest value of each metric) in MLflow's own column naming."""
    slug = {r.run_id: g.slug for g in groups for r in [*g.group.runs, *g.group.summaries]}
    unstable = set().union(*(g.unstable for g in groups))
    params = sorted({k for r in sel.records for k in r.params})
    metrics = sorted({k for r in sel.records for k in r.metrics})
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow([*RUN_COLUMNS, *(f"params.{p}" for p in params),
                         *(f"metrics.{m}" for m in metrics)])
        for r in sel.records:
            writer.writerow([
                r.run_id, r.experiment_id, r.name, r.kind, slug.get(r.run_id, ""),
                r.start_time, r.eps * 255 if r.cfg else "", r.gap_ratio() if r.cfg else "",
                r.run_id in unstable, *(r.params.get(p, "") for p in params),
                *(r.metrics.get(m, "") for m in metrics)])


def write_groups_csv(path: Path, groups: Sequence[GroupReport]) -> None:
    """One row per group: R*(0) and the ε* estimates, in /255."""
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["group", "label", "runs", "threshold", "epsstar_255", "lower_255",
                         "upper_255", "bound", "boot_lower_255", "boot_upper_255",
                         "finetune_pgd_255", "finetune_fgm_255", "unstable_eps_255"])
        for g in groups:
            e = g.scratch
            writer.writerow([
                g.slug, g.label, len(g.group.runs), _csv(g.threshold),
                *(_csv(v, 255) for v in ((e.epsstar, e.lower, e.upper) if e else (None,) * 3)),
                e.bound or "" if e else "",
                *(_csv(v, 255) for v in (g.interval or (None, None))),
                _csv(_finetune_value(g, "pgd"), 255), _csv(_finetune_value(g, "fgm"), 255),
                _csv(g.unstable_eps, 255)])


def _csv(value: float | None, scale: float = 1.0) -> str:
    return "" if value is None or not math.isfinite(value) else repr(value * scale)


def _finetune_value(g: GroupReport, attack: str) -> float | None:
    best = headline_finetune(g, attack)
    return best.estimate.epsstar if best and best.estimate.bound is None else None


def draw_figures(root: Path, groups: Sequence[GroupReport], curves: Sequence[Curve]) -> list[Path]:
    """Write the PNGs under ``root/plots`` and return their paths."""
    import matplotlib.pyplot as plt

    from epsstar.plots import LearningCurves, loss_vs_eps_figure

    (root / "plots").mkdir(parents=True, exist_ok=True)
    for old in (root / "plots").glob("g[0-9][0-9]-*.png"):  # an earlier report's figures
        old.unlink()
    written = []
    for g in groups:
        if g.threshold is None:
            continue
        fig = loss_vs_eps_figure(
            [(r.eps, statistics.fmean(r.values("best_train_adv_loss"))) for r in g.rows],
            g.threshold, g.scratch, runs=[(r.eps, r.metric("best_train_adv_loss"))
                                          for r in [*g.group.clean, *g.group.scratch]],
            finetune=_finetune_series(g), unstable_eps=g.unstable_eps, title=g.label)
        written.append(_save(fig, root / _loss_plot_path(g)))
        plt.close(fig)
    plotter = LearningCurves() if curves else None
    for c in curves:
        fig = plotter.draw(
            {k: v for k, v in c.series.items() if k != "lr"}, gap=c.gap(),
            best_epoch=c.run.metric("best_epoch"), lr_drop_epoch=c.lr_drop_epoch(),
            title=f"{c.run.name} ({c.run.kind}, eps={fmt255(c.run.eps)}/255)")
        written.append(_save(fig, root / _curve_path(c)))
    if plotter is not None:
        plt.close(plotter.fig)
    return written


def _finetune_series(g: GroupReport) -> dict[str, tuple[list[tuple[float, float]], Estimate]]:
    """Per attack: the fine-tuned points of the group and the all-point estimate."""
    series = {}
    for attack in sorted({f.attack for f in g.finetune}):
        best = headline_finetune(g, attack)
        points = [(r.eps, r.metric("best_train_adv_loss")) for r in g.group.finetune
                  if r.cfg.attack == attack]
        series[attack.upper()] = (points, best.estimate)
    return series


def _save(fig: Any, path: Path) -> Path:
    fig.savefig(path, dpi=90)
    return path


# =============================================================================== the workflow
@dataclass(frozen=True)
class ReportResult:
    """What :func:`make_report` did."""

    out: Path  # the output directory
    groups: list[GroupReport]  # in report order
    n_runs: int  # training runs reported (parent runs with logged estimates not counted)
    report_run_id: str | None  # the report run, None with ``log=False``
    files: list[Path]  # everything written: report.md/.html, runs.csv, groups.csv, plots/*.png


def make_report(cfg: ReportConfig) -> ReportResult:
    """Read, group, analyse, write ``cfg.out`` and (unless ``cfg.log`` is False) log it."""
    out = _prepare_out(cfg.out)
    client = open_client(cfg.tracking_uri)
    sel = read_runs(client, cfg)
    groups = compare_with_unstable([analyze_group(g, i + 1, n_boot=cfg.n_boot)
                                    for i, g in enumerate(group_runs(sel.records))])
    curves = fetch_histories(client, curve_candidates(groups), cfg.max_curves)
    files = draw_figures(out, groups, curves)
    blocks = summary_blocks(sel, groups, curves, time.strftime("%Y-%m-%d %H:%M:%S %Z"))
    (out / "report.md").write_text(render_markdown(blocks), encoding="utf-8")
    (out / "report.html").write_text(render_html(blocks, out), encoding="utf-8")
    write_runs_csv(out / "runs.csv", sel, groups)
    write_groups_csv(out / "groups.csv", groups)
    files = [out / name for name in ("report.md", "report.html", "runs.csv", "groups.csv")] + files
    n_runs = sum(r.cfg is not None for r in sel.records)
    run_id = log_report(client, out, files, cfg, groups[0].group.experiment_id, n_runs) \
        if cfg.log else None
    return ReportResult(out, groups, n_runs, run_id, files)


def _prepare_out(out: Path) -> Path:
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file, not a directory")
    out.mkdir(parents=True, exist_ok=True)
    return out


def log_report(client: mlflow.MlflowClient, out: Path, files: Sequence[Path], cfg: ReportConfig,
               experiment_id: str, n_runs: int) -> str:
    """Log the report's ``files`` (paths under ``out``; only those: ``out`` may hold anything
    else) as the artifacts of a report run: the run ``mlflow run`` made for us (MLFLOW_RUN_ID;
    it ends that run itself), else a new FINISHED run in ``experiment_id``."""
    env_run = os.environ.get("MLFLOW_RUN_ID")
    tags = {tracking.TAG_ROLE: "report"}
    with _store_errors(client.tracking_uri, check_exists=False):
        run_id = env_run or client.create_run(experiment_id, run_name="report",
                                              tags=tags).info.run_id
    try:
        client.set_tag(run_id, tracking.TAG_ROLE, "report")
        if not env_run:  # `mlflow run` logged its own parameters under these names
            client.log_batch(run_id, params=[Param(k, v) for k, v in
                                             _report_params(cfg, n_runs).items()])
        for path in files:
            folder = path.parent.relative_to(out).as_posix()
            client.log_artifact(run_id, str(path), None if folder == "." else folder)
    except BaseException as exc:
        if not env_run:
            client.set_terminated(run_id, tracking.end_status_for(exc))
        raise
    if not env_run:
        client.set_terminated(run_id, "FINISHED")
    return run_id


def _report_params(cfg: ReportConfig, n_runs: int) -> dict[str, str]:
    return {"experiments": ",".join(cfg.experiments) or "(all)", "study": cfg.study or "",
            "parent": cfg.parent or "", "n_runs": str(n_runs), "max_curves": str(cfg.max_curves)}
