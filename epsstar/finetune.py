"""``finetune_epsstar``: ε* from short adversarial fine-tunes of the clean checkpoint (SPEC §5,
Algorithm A.1 of the paper).

Clean and adversarial models are well connected for small ε, so instead of training from scratch
at many ε, the clean run's best checkpoint is fine-tuned adversarially at a few small ε (paper:
40 epochs instead of 200, a triangular learning rate peaking at the clean run's base lr). Each
fine-tuned model's adversarial training loss at its best epoch, with the clean point
(0, clean training loss), gives a least-squares line; ε* is where it reaches R*(0).

Tracking layout (same pattern as :mod:`epsstar.search`): one parent run, tag
``epsstar.role=finetune-search``, holds the answer (metrics ``epsstar_ft``, ``epsstar_ft_1pt``…
and the ``report/`` artifacts); every fine-tune is a child run (``epsstar.role=finetune``,
``mlflow.parentRunId``) trained by :func:`epsstar.run.run_training`, so identical finished runs
are reused and a rerun trains nothing new. A rerun logs into the same parent (found by its
``epsstar.study`` tag), the way a rerun of ``find`` continues its search run.

All ε are in pixel units (inputs in [0, 1]); the ``_255`` metrics are for humans.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from mlflow.exceptions import MlflowException

from epsstar import tracking
from epsstar.config import ATTACKS, ConfigError, TrainConfig
from epsstar.estimate import Estimate, extrapolate_epsstar
from epsstar.run import RunOutcome, run_training

ROLE = "finetune-search"  # epsstar.role of the parent run (children: "finetune", from cfg.role)
TAG_CLEAN_RUN = "epsstar.clean_run"  # the parent's clean run (a tag: a rerun may resolve anew)
TAG_BOUND = "epsstar.bound_ft"  # "none" | "above" | "below": is epsstar_ft a bound?
TAG_BOUND_1PT = "epsstar.bound_ft_1pt"

# A clean run given by id must have been trained on the same data with the same model as the
# command asks for: its checkpoint must load, and R*(0) is only a threshold for the same task.
MUST_MATCH = ("dataset", "arch", "width", "n_train", "val_fraction")
# The fine-tunes take these from the command (the attack, and where to run); everything else
# (optimizer, lr = peak lr, batch size, seed, augmentation, epochs) continues the clean run's.
FROM_COMMAND = ("norm", "steps", "step_size", "loss", "beta", "data_dir") + tuple(
    f.name for f in fields(TrainConfig) if not f.metadata.get("identity", True))

Echo = Callable[[str], None]


# --------------------------------------------------------------------------- configuration
@dataclass(frozen=True)
class FinetuneConfig:
    """Algorithm A.1: which ε to fine-tune at, with which attack, for how long."""

    # fine-tune radii, pixel units, each > 0 (paper: 0.25, 0.5, 1 /255); stored sorted
    eps_list: tuple[float, ...] = (0.25 / 255, 0.5 / 255, 1 / 255)
    attack: str = "pgd"  # pgd | fgm: the fine-tuning attack (FGM is the paper's cheaper variant)
    epochs_fraction: float = 0.2  # fine-tune epochs = this × the clean run's epochs (40/200), ≥ 1
    epochs: int = 0  # > 0: this many fine-tune epochs, overriding epochs_fraction
    one_point_eps: float = 0.0  # ε of the one-point estimate, pixel units; 0 = middle of eps_list
    clean_run_id: str = ""  # "" = the FINISHED clean run of the same config (trained if missing)
    compare_scratch: bool = False  # also train one from-scratch run at one_point_eps, for timing

    def __post_init__(self) -> None:
        eps = tuple(sorted(float(e) for e in self.eps_list))
        object.__setattr__(self, "eps_list", eps)  # frozen: normalise once, here
        if not eps:
            raise ConfigError("need at least one fine-tune eps (--eps-list 0.25/255,0.5/255,1/255)")
        if not all(math.isfinite(e) and e > 0 for e in eps):
            raise ConfigError(f"fine-tune eps must be > 0 (the clean run is eps = 0), got "
                              f"{', '.join(f'{e * 255:g}/255' for e in eps)}")
        if len(set(eps)) != len(eps):
            raise ConfigError("fine-tune eps list has duplicates")
        if self.attack not in ATTACKS:
            raise ConfigError(f"unknown attack {self.attack!r}; choose one of: "
                              f"{', '.join(ATTACKS)}")
        if not (math.isfinite(self.epochs_fraction) and 0 < self.epochs_fraction <= 1):
            raise ConfigError(f"epochs_fraction must be in (0, 1], got {self.epochs_fraction}")
        if self.epochs < 0:
            raise ConfigError(f"fine-tune epochs must be >= 0 (0 = use epochs_fraction), "
                              f"got {self.epochs}")
        if self.one_point_eps and not any(math.isclose(self.one_point_eps, e) for e in eps):
            raise ConfigError(f"one_point_eps {self.one_point_eps * 255:g}/255 is not in the "
                              "fine-tune eps list")

    @property
    def one_point(self) -> float:
        """The ε (pixel units) of the one-point estimate: ``one_point_eps``, else the middle of
        the sorted list (the lower middle for an even count; paper: 0.5/255)."""
        if self.one_point_eps:
            return next(e for e in self.eps_list if math.isclose(self.one_point_eps, e))
        return self.eps_list[(len(self.eps_list) - 1) // 2]

    def finetune_epochs(self, clean_epochs: int) -> int:
        """Epochs of each fine-tune for a clean run of ``clean_epochs`` epochs."""
        return self.epochs or max(1, round(self.epochs_fraction * clean_epochs))


@dataclass(frozen=True)
class FinetuneResult:
    """What :func:`finetune_epsstar` answers. ε in pixel units."""

    parent_run_id: str
    clean_run_id: str
    threshold: float  # R*(0): the clean run's clean test loss at its best epoch
    clean_train_loss: float  # the clean run's training loss at its best epoch (the ε = 0 point)
    estimate: Estimate  # least-squares line through the clean point and every fine-tune
    estimate_1pt: Estimate  # line through the clean point and the fine-tune at one_point
    one_point_eps: float
    rows: list[dict[str, Any]]  # one per fine-tune: eps, eps_255, loss, seconds, run_id, reused
    finetune_seconds: float  # sum of the fine-tunes' train_seconds
    clean_seconds: float  # the clean run's train_seconds
    template: TrainConfig  # the fine-tunes' config (their eps and init aside)
    scratch: dict[str, Any] | None = None  # compare_scratch: run_id, seconds, time_saved_fraction


# --------------------------------------------------------------------------- the clean run
def _get_run(run_id: str):
    try:
        return tracking.client().get_run(run_id)
    except MlflowException:
        raise ConfigError(f"no run {run_id!r} in the tracking store") from None


def _given_clean_run(cfg: TrainConfig, run_id: str) -> tuple[TrainConfig, RunOutcome]:
    """Check that ``run_id`` is a FINISHED clean run of the asked data and model."""
    run = _get_run(run_id)
    clean_cfg = TrainConfig.from_params(run.data.params)
    if clean_cfg.eps != 0 or clean_cfg.init != "scratch":
        raise ConfigError(f"run {run_id} is not a clean run (eps={clean_cfg.eps:g}, "
                          f"init={clean_cfg.init})")
    if run.info.status != "FINISHED":
        raise ConfigError(f"clean run {run_id} is {run.info.status}, not FINISHED")
    differ = [f"{k}={getattr(clean_cfg, k)} (asked {getattr(cfg, k)})"
              for k in MUST_MATCH if getattr(clean_cfg, k) != getattr(cfg, k)]
    if differ:
        raise ConfigError(f"clean run {run_id} has {', '.join(differ)}")
    missing = [k for k in ("best_test_clean_loss", "best_train_adv_loss", "train_seconds")
               if k not in run.data.metrics]
    if missing:
        raise ConfigError(f"clean run {run_id} has no {', '.join(missing)} metric")
    return clean_cfg, RunOutcome(run_id, dict(run.data.metrics), reused=True)


def resolve_clean_run(cfg: TrainConfig, ft: FinetuneConfig,
                      experiment_id: str) -> tuple[TrainConfig, RunOutcome | None]:
    """The clean configuration and its FINISHED run; the run is None when it must be trained.

    With ``ft.clean_run_id`` that run (checked); otherwise the newest FINISHED run of
    ``cfg.replace(eps=0)`` — the clean run ``epsstar train``/``find`` made for this config.
    """
    if ft.clean_run_id:
        return _given_clean_run(cfg, ft.clean_run_id)
    clean_cfg = cfg.replace(eps=0.0)
    done = tracking.find_finished_run(experiment_id, clean_cfg.config_hash())
    if done is None:
        return clean_cfg, None
    return clean_cfg, RunOutcome(done.info.run_id, dict(done.data.metrics), reused=True)


def finetune_template(cfg: TrainConfig, clean_cfg: TrainConfig, ft: FinetuneConfig) -> TrainConfig:
    """Every fine-tune's config but ε and init: the clean run's training setup, the command's
    attack, the fine-tune length, and a triangular schedule peaking at the clean run's lr."""
    ours = {k: getattr(cfg, k) for k in FROM_COMMAND}
    return clean_cfg.replace(**ours, attack=ft.attack, schedule="triangular",
                             epochs=ft.finetune_epochs(clean_cfg.epochs))


# --------------------------------------------------------------------------- the parent run
def study_name(clean_cfg: TrainConfig, template: TrainConfig, ft: FinetuneConfig) -> str:
    """One parent per (clean config, fine-tune setup): a rerun finds and continues it."""
    key = json.dumps([clean_cfg.config_hash(), template.config_hash(), ft.eps_list,
                      ft.one_point])
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    return f"finetune-{template.dataset}-{template.arch}-{template.norm}-{ft.attack}-{digest}"


def _parent_params(template: TrainConfig, clean_cfg: TrainConfig,
                   ft: FinetuneConfig) -> dict[str, Any]:
    """What the parent's name stands for (identity fields only, so a rerun logs equal values)."""
    params = {k: v for k, v in template.identity().items() if k not in ("eps", "init")}
    params.update(eps_list=",".join(f"{e:.6g}" for e in ft.eps_list),
                  eps_list_255=",".join(f"{e * 255:.4g}" for e in ft.eps_list),
                  one_point_eps=ft.one_point, clean_epochs=clean_cfg.epochs)
    return params


def _parent_run(name: str, experiment_id: str, params: dict[str, Any]) -> tracking.RunTracker:
    """The run ``mlflow run`` made for us, else the last parent of this study, else a new one."""
    tags = {tracking.TAG_ROLE: ROLE, tracking.TAG_STUDY: name}
    env_run = os.environ.get("MLFLOW_RUN_ID")
    if env_run:
        tracker = tracking.RunTracker(env_run)
        tracker.set_tags(tags)
    else:
        runs = tracking.client().search_runs(
            [experiment_id], max_results=1, order_by=["attributes.start_time DESC"],
            filter_string=f"tags.`{tracking.TAG_ROLE}` = '{ROLE}' and "
                          f"tags.`{tracking.TAG_STUDY}` = '{name}'",
        )
        if runs:
            tracker = tracking.RunTracker.attach(runs[0].info.run_id, tags=tags)
        else:
            run = tracking.retry(lambda: tracking.client().create_run(
                experiment_id, run_name=name.rsplit("-", 1)[0], tags=tags), what="create_run")
            tracker = tracking.RunTracker(run.info.run_id)
    existing = tracking.run_params(tracker.run_id)
    tracker.log_params({k: v for k, v in params.items() if k not in existing})
    return tracker


# --------------------------------------------------------------------------- the workflow
def finetune_epsstar(
    cfg: TrainConfig,
    ft: FinetuneConfig,
    *,
    experiment_id: str | None = None,
    checkpoint_root: str | Path = "checkpoints",
    log_model: bool = True,
    download: bool = False,
    echo: Echo | None = None,
) -> FinetuneResult:
    """Algorithm A.1: fine-tune the clean checkpoint at each ``ft.eps_list`` ε, extrapolate ε*.

    ``cfg`` is the clean configuration (``cfg.eps`` is ignored; ``cfg.attack`` only names the
    clean run, whose identity includes it — the fine-tunes use ``ft.attack``; ``cfg.init`` must
    be ``scratch``). Bad input (an unknown clean run, one of other data or model) raises
    :class:`ConfigError` before any run is created. ``echo`` receives one line per finished
    child run.
    """
    if cfg.init != "scratch":
        raise ConfigError(f"init={cfg.init}: fine-tuning starts from a clean run trained from "
                          "scratch (pick one with --clean-run RUN_ID)")
    experiment_id = experiment_id or tracking.get_or_create_experiment()
    clean_cfg, clean = resolve_clean_run(cfg, ft, experiment_id)
    template = finetune_template(cfg, clean_cfg, ft)
    name = study_name(clean_cfg, template, ft)
    parent = _parent_run(name, experiment_id, _parent_params(template, clean_cfg, ft))
    ctx = _Context(experiment_id, parent, name, Path(checkpoint_root), log_model, download,
                   echo or (lambda _line: None))
    try:
        result = _finetune(clean_cfg, clean, template, ft, ctx)
    except BaseException as exc:
        parent.end(tracking.end_status_for(exc))
        raise
    if os.environ.get("MLFLOW_RUN_ID"):  # `mlflow run` ends its own run when the command exits
        parent.flush()
    else:
        parent.end("FINISHED")
    return result


@dataclass(frozen=True)
class _Context:
    """Where child runs go and how they are trained (shared by every child of one parent)."""

    experiment_id: str
    parent: tracking.RunTracker
    study: str
    checkpoint_root: Path
    log_model: bool
    download: bool
    echo: Echo

    def train(self, cfg: TrainConfig) -> RunOutcome:
        outcome = run_training(
            cfg, experiment_id=self.experiment_id, parent_run_id=self.parent.run_id,
            tags={tracking.TAG_STUDY: self.study}, checkpoint_root=self.checkpoint_root,
            log_model=self.log_model, download=self.download, progress=False,
        )
        m = outcome.metrics
        self.echo(f"{cfg.role} eps={cfg.eps_255:.4g}/255 ({cfg.attack}, {cfg.epochs} epochs): "
                  f"adv train loss {m['best_train_adv_loss']:.4f}, {m['train_seconds']:.1f} s"
                  f"{' (reused)' if outcome.reused else ''} [run {outcome.run_id}]")
        return outcome


def _finetune(clean_cfg: TrainConfig, clean: RunOutcome | None, template: TrainConfig,
              ft: FinetuneConfig, ctx: _Context) -> FinetuneResult:
    if clean is None:  # no clean run of this config yet: train it, as find_epsstar does
        clean = ctx.train(clean_cfg)
    ctx.parent.set_tags({TAG_CLEAN_RUN: clean.run_id})
    threshold = clean.metrics["best_test_clean_loss"]  # R*(0)
    clean_train_loss = clean.metrics["best_train_adv_loss"]
    init = f"runs:/{clean.run_id}"
    rows = [_row(eps, ctx.train(template.replace(eps=eps, init=init))) for eps in ft.eps_list]
    losses = [r["loss"] for r in rows]
    one = next(r for r in rows if r["eps"] == ft.one_point)
    result = FinetuneResult(
        parent_run_id=ctx.parent.run_id, clean_run_id=clean.run_id, threshold=threshold,
        clean_train_loss=clean_train_loss,
        estimate=extrapolate_epsstar(ft.eps_list, losses, clean_train_loss, threshold),
        estimate_1pt=extrapolate_epsstar([one["eps"]], [one["loss"]], clean_train_loss,
                                         threshold),
        one_point_eps=ft.one_point, rows=rows,
        finetune_seconds=sum(r["seconds"] for r in rows),
        clean_seconds=clean.metrics["train_seconds"], template=template,
    )
    if ft.compare_scratch:
        result = _with_scratch(result, clean_cfg.replace(eps=ft.one_point, attack=ft.attack), ctx)
    log_result(ctx.parent, result)
    return result


def _row(eps: float, outcome: RunOutcome) -> dict[str, Any]:
    m = outcome.metrics
    return {"eps": eps, "eps_255": eps * 255, "loss": m["best_train_adv_loss"],
            "best_epoch": int(m["best_epoch"]), "seconds": m["train_seconds"],
            "run_id": outcome.run_id, "reused": outcome.reused}


def _with_scratch(result: FinetuneResult, scratch_cfg: TrainConfig,
                  ctx: _Context) -> FinetuneResult:
    """Train (or reuse) one from-scratch run at the one-point ε with the clean run's full
    schedule: the cost that a fine-tune replaces."""
    outcome = ctx.train(scratch_cfg)
    seconds = outcome.metrics["train_seconds"]
    mean_ft = result.finetune_seconds / len(result.rows)
    scratch = {"run_id": outcome.run_id, "eps": scratch_cfg.eps, "epochs": scratch_cfg.epochs,
               "seconds": seconds, "loss": outcome.metrics["best_train_adv_loss"],
               "time_saved_fraction": 1.0 - mean_ft / seconds}
    return dataclasses.replace(result, scratch=scratch)


# --------------------------------------------------------------------------- results
def _finite(x: float) -> float:
    """The MLflow UI cannot plot inf: an open interval end is logged as NaN."""
    return x if math.isfinite(x) else float("nan")


def _jsonable(value: Any) -> Any:
    """JSON has no infinity: the open end of an interval or bound is written as null."""
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def result_metrics(result: FinetuneResult) -> dict[str, float]:
    """The parent run's metrics (ε in pixel units; ``_255`` in /255)."""
    e, e1 = result.estimate, result.estimate_1pt
    metrics = {
        "threshold": result.threshold, "clean_train_loss": result.clean_train_loss,
        "epsstar_ft": e.epsstar, "epsstar_ft_255": e.epsstar * 255,
        "epsstar_ft_lower": e.lower, "epsstar_ft_upper": _finite(e.upper),
        "epsstar_ft_1pt": e1.epsstar, "epsstar_ft_1pt_255": e1.epsstar * 255,
        "finetune_seconds": result.finetune_seconds, "clean_seconds": result.clean_seconds,
        "n_finetune_runs": len(result.rows),
    }
    if result.scratch is not None:
        metrics["scratch_seconds"] = result.scratch["seconds"]
        metrics["time_saved_fraction"] = result.scratch["time_saved_fraction"]
    return metrics


def log_result(parent: tracking.RunTracker, result: FinetuneResult) -> None:
    """Metrics, bound tags and the ``report/`` artifacts (finetune.json, finetune.md, plot)."""
    import matplotlib.pyplot as plt

    from epsstar.plots import loss_vs_eps_figure

    template = result.template
    parent.log_metrics(result_metrics(result))
    parent.set_tags({TAG_BOUND: str(result.estimate.bound).lower(),
                     TAG_BOUND_1PT: str(result.estimate_1pt.bound).lower()})
    points = [(0.0, result.clean_train_loss)] + [(r["eps"], r["loss"]) for r in result.rows]
    fig = loss_vs_eps_figure([], result.threshold, finetune={template.attack: (
        points, result.estimate)}, title=f"{template.dataset}/{template.arch}: "
        f"{template.attack} fine-tunes of the clean run")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "finetune.json").write_text(json.dumps(_jsonable(asdict(result)), indent=2))
        (tmp / "finetune.md").write_text(summary_markdown(result))
        fig.savefig(tmp / "finetune_loss_vs_eps.png", dpi=120, bbox_inches="tight")
        for path in sorted(tmp.iterdir()):
            parent.log_artifact(path, "report")
    plt.close(fig)


def describe(estimate: Estimate) -> str:
    """ε̂ in pixel units and /255, or the bound it is."""
    e = estimate
    if e.bound == "below":
        return f"< {e.upper:.4g} ({e.upper * 255:.3g}/255, line above R*(0) already at eps=0)"
    if e.bound == "above":
        return f"> {e.lower:.4g} ({e.lower * 255:.3g}/255, line never rises)"
    return f"{e.epsstar:.4g} ({e.epsstar * 255:.3g}/255)"


def summary_line(result: FinetuneResult) -> str:
    """The one-line human summary the command prints."""
    template = result.template
    line = (f"{template.dataset}/{template.arch}/{template.norm} {template.attack} fine-tune "
            f"({len(result.rows)} eps, {template.epochs} epochs each): R*(0) = "
            f"{result.threshold:.4f}; eps*_ft = {describe(result.estimate)}; 1-point at "
            f"{result.one_point_eps * 255:.3g}/255: {describe(result.estimate_1pt)}; "
            f"fine-tunes {result.finetune_seconds:.1f} s, clean run {result.clean_seconds:.1f} s")
    if result.scratch is not None:
        s = result.scratch
        line += (f", scratch run {s['seconds']:.1f} s ({s['time_saved_fraction']:.0%} saved "
                 "per eps)")
    return f"{line} (parent run {result.parent_run_id})"


def summary_markdown(result: FinetuneResult) -> str:
    template = result.template
    lines = [
        f"# eps* by adversarial fine-tuning ({template.attack}, {template.epochs} epochs each)",
        "",
        f"- clean run `{result.clean_run_id}`: R*(0) = {result.threshold:.4f}, clean training "
        f"loss {result.clean_train_loss:.4f}, {result.clean_seconds:.1f} s",
        f"- {len(result.rows)}-point extrapolation: eps* = {describe(result.estimate)}",
        f"- 1-point at {result.one_point_eps * 255:.3g}/255: eps* = "
        f"{describe(result.estimate_1pt)}",
        f"- fine-tunes: {result.finetune_seconds:.1f} s in all",
    ]
    if result.scratch is not None:
        s = result.scratch
        lines.append(f"- one from-scratch run at {s['eps'] * 255:.3g}/255 (`{s['run_id']}`): "
                     f"{s['seconds']:.1f} s; a fine-tune saves {s['time_saved_fraction']:.1%}")
    lines += ["", "| eps (/255) | eps | adv train loss | best epoch | seconds | run |",
              "|---|---|---|---|---|---|"]
    for r in result.rows:
        lines.append(f"| {r['eps_255']:.4g} | {r['eps']:.6g} | {r['loss']:.4f} | "
                     f"{r['best_epoch']} | {r['seconds']:.1f} | `{r['run_id']}` |")
    return "\n".join(lines) + "\n"
