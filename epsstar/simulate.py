"""The linear-regression phase transition (paper Section 4, SPEC §6), reproduced and tracked.

For every (d, n): R data sets; on each, clean and adversarial gradient descent over a log grid of
ε around √(d/n) (:mod:`epsstar.linear`); and ε* found by the same Optuna search as for neural
networks (:class:`epsstar.sampler.BisectionSampler`), where one "training run" at ε is the linear
model trained on all R data sets and its value is the mean adversarial training loss R̂(θ̂(ε), ε);
the threshold R*(0) is the clean runs' mean (exact) clean test loss.

Tracking: one parent run — the run ``mlflow run`` started (``MLFLOW_RUN_ID``) or else a new run
named "simulate" — and one nested child run per (d, n), tag ``epsstar.role=simulate``. Curves are
metrics with ``step`` = grid index (``log_eps_ratio`` = log10(ε/√(d/n)) gives the x axis);
figures are PNG artifacts under ``figures/``. Each run ends FINISHED, or FAILED when an exception
escapes.

Heavy imports (numpy, scipy, optuna, MLflow, matplotlib) happen inside the functions so that
``epsstar --help`` stays fast: the CLI imports this module only for :class:`SimulateConfig`.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from epsstar.config import NORMS, ConfigError

if TYPE_CHECKING:
    import numpy as np
    from matplotlib.figure import Figure
    from mlflow.entities import Metric

    from epsstar.estimate import Estimate
    from epsstar.linear import Curves, Problem

ROLE = "simulate"
GRID_DECADES = 2.0  # the ε grid spans ε/√(d/n) ∈ [10⁻², 10²]
MAX_TRIALS = 40  # safety cap on the ε* search (it converges in ~5–10 trials)
STEP_RATIOS = (0.1, 1.0, 10.0)  # ε/√(d/n) of the per-step trajectory curves in the figure


# ---------------------------------------------------------------------------------------------
# configuration


@dataclass(frozen=True)
class SimulateConfig:
    """One ``epsstar simulate`` invocation: a set of (d, n) settings and how to run each."""

    d: tuple[int, ...] = (2, 5, 10)  # input dimensions
    n: tuple[int, ...] = (100,)  # training-set sizes
    norm: str = "l2"  # attack norm: l2 | linf
    reps: int = 300  # data sets per (d, n); each gets a clean run and one run per ε
    n_eps: int = 25  # grid points, log-spaced in ε/√(d/n) over [1e-2, 1e2]
    sigma: float = 1.0  # noise standard deviation (‖θ₀‖ = 1, so 1 means SNR 1)
    seed: int = 0
    rtol: float = 0.05  # the ε* search stops when its bracket's relative width is <= rtol
    steps: int = 100  # gradient-descent steps: the horizon early stopping chooses from

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        if not self.d or not self.n:
            raise ConfigError("d and n need at least one value each")
        if min(self.d) < 1 or min(self.n) < 1:
            raise ConfigError(f"d and n must be >= 1, got d={self.d}, n={self.n}")
        if self.norm not in NORMS:
            raise ConfigError(f"unknown norm {self.norm!r}; choose one of: {', '.join(NORMS)}")
        # Hotelling's T² against the other reps - 1 clean runs needs reps - 1 > d
        if self.reps < max(self.d) + 2:
            raise ConfigError(
                f"reps must be >= d + 2 = {max(self.d) + 2} (the p-value of θ compares each "
                f"run with the other reps - 1 clean runs in d dimensions), got {self.reps}"
            )
        if self.n_eps < 2:
            raise ConfigError(f"n_eps must be >= 2, got {self.n_eps}")
        if not math.isfinite(self.sigma) or self.sigma <= 0:
            raise ConfigError(f"sigma must be a finite number > 0, got {self.sigma}")
        if not 0 < self.rtol < 1:
            raise ConfigError(f"rtol must be in (0, 1), got {self.rtol}")
        if self.steps < 1:
            raise ConfigError(f"steps must be >= 1, got {self.steps}")

    def settings(self) -> list[tuple[int, int]]:
        """The (d, n) pairs, n-major."""
        return [(d, n) for n in self.n for d in self.d]

    def to_params(self) -> dict[str, Any]:
        """MLflow params of the parent run (lists written as on the command line)."""
        params = dataclasses.asdict(self)
        params["d"] = _join(self.d)
        params["n"] = _join(self.n)
        return params


def _join(values: Sequence[int]) -> str:
    return ",".join(str(v) for v in values)


def parse_int_list(text: str, name: str) -> tuple[int, ...]:
    """``"2,5,10"`` -> ``(2, 5, 10)``; raises :class:`ConfigError` naming the option."""
    try:
        return tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise ConfigError(f"{name} expects comma-separated integers, got {text!r}") from None


# ---------------------------------------------------------------------------------------------
# one (d, n) setting, no tracking


@dataclass(frozen=True)
class SettingResult:
    """The curves and ε* of one (d, n) setting."""

    d: int
    n: int
    curves: Curves
    estimate: Estimate  # ε* from the Optuna search
    grid_estimate: Estimate  # ε* interpolated on the grid curve (a cross-check of the search)
    n_trials: int  # completed search trials

    @property
    def scale(self) -> float:
        """√(d/n), the paper's predicted ε*."""
        return math.sqrt(self.d / self.n)

    def summary(self) -> dict[str, float]:
        """The setting's scalar metrics (non-finite bracket ends included as ``inf``)."""
        c, e = self.curves, self.estimate
        return {
            "sqrt_d_over_n": self.scale,
            "threshold": c.threshold,
            "clean_train_loss": c.clean_train_loss,
            "clean_stop_step": c.clean_stop,
            "epsstar": e.epsstar,
            "epsstar_lower": e.lower,
            "epsstar_upper": e.upper,
            "epsstar_ratio": e.epsstar / self.scale,
            "epsstar_grid": self.grid_estimate.epsstar,
            "n_trials": float(self.n_trials),
        }


def sample(cfg: SimulateConfig, d: int, n: int) -> Problem:
    """The R data sets of one setting, seeded by (seed, d, n): reproducible on their own."""
    import numpy as np

    from epsstar.linear import sample_problem

    return sample_problem(d, n, cfg.reps, cfg.sigma, np.random.default_rng([cfg.seed, d, n]))


def eps_grid(cfg: SimulateConfig, d: int, n: int) -> np.ndarray:
    """(n_eps,) ε values, log-spaced around √(d/n) (units of x)."""
    import numpy as np

    return math.sqrt(d / n) * np.logspace(-GRID_DECADES, GRID_DECADES, cfg.n_eps)


def simulate_setting(cfg: SimulateConfig, d: int, n: int) -> SettingResult:
    """Curves on the ε grid, then the ε* search, for one (d, n)."""
    from epsstar.estimate import interpolate_epsstar
    from epsstar.linear import default_lr, phase_curves

    problem = sample(cfg, d, n)
    lr = default_lr(d, n)
    curves = phase_curves(problem, eps_grid(cfg, d, n), cfg.norm, lr=lr, steps=cfg.steps)
    estimate, n_trials = search_epsstar(problem, curves, cfg.norm, lr=lr, steps=cfg.steps,
                                        rtol=cfg.rtol)
    grid_estimate = interpolate_epsstar(curves.eps, curves.adv_train_loss, curves.threshold,
                                        clean_train_loss=curves.clean_train_loss)
    return SettingResult(d, n, curves, estimate, grid_estimate, n_trials)


def search_epsstar(
    problem: Problem, curves: Curves, norm: str, *, lr: float, steps: int, rtol: float
) -> tuple[Estimate, int]:
    """ε* by :class:`~epsstar.sampler.BisectionSampler` in an in-memory Optuna study.

    Searches the grid's range; each trial trains the linear model at the proposed ε on every
    data set of ``problem``. Returns the estimate and the number of completed trials (0 when
    the clean run is already above the threshold: the bound ε* < 0 without a search).
    """
    import optuna

    from epsstar.estimate import interpolate_epsstar
    from epsstar.linear import adv_train_loss
    from epsstar.sampler import BisectionSampler, estimate_from_study

    if not curves.clean_train_loss < curves.threshold:
        # no generalisation gap (tiny or unconverged settings): the clean point itself is above
        # R*(0), so ε* < every ε; SPEC §3 reports that bound rather than searching
        return interpolate_epsstar([0.0], [curves.clean_train_loss], curves.threshold), 0
    low, high = float(curves.eps[0]), float(curves.eps[-1])
    sampler = BisectionSampler(curves.threshold, low, high, rtol,
                               clean_train_loss=curves.clean_train_loss, max_trials=MAX_TRIALS)
    study = optuna.create_study(direction="minimize", sampler=sampler)
    sampler.check_study(study)

    def objective(trial: optuna.Trial) -> float:
        eps = trial.suggest_float("eps", low, high, log=True)
        return adv_train_loss(eps, problem, norm, lr=lr, steps=steps)

    study.optimize(objective, n_trials=MAX_TRIALS)
    n_trials = len(study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)))
    return estimate_from_study(study), n_trials


# ---------------------------------------------------------------------------------------------
# tracking


def run(cfg: SimulateConfig) -> list[SettingResult]:
    """Simulate every setting of ``cfg`` under one MLflow parent run; return the results."""
    import mlflow

    from epsstar import tracking

    fresh = {} if os.environ.get("MLFLOW_RUN_ID") else {
        "run_name": ROLE, "experiment_id": tracking.get_or_create_experiment()}
    with mlflow.start_run(**fresh) as parent:
        _log_new_params(parent.info.run_id, cfg.to_params())
        tags = _tags()
        mlflow.set_tags(tags)
        results = [_tracked_setting(cfg, d, n, parent.info.experiment_id, tags)
                   for d, n in cfg.settings()]
        mlflow.log_figure(plot(results, cfg), "figures/simulate.png")
        mlflow.log_text(table_csv(results), "simulate.csv")
    return results


def _tracked_setting(
    cfg: SimulateConfig, d: int, n: int, experiment_id: str, tags: dict[str, str]
) -> SettingResult:
    import mlflow

    from epsstar import tracking
    from epsstar.linear import default_lr

    with mlflow.start_run(run_name=f"{ROLE}-{cfg.norm}-d{d}-n{n}", nested=True,
                          experiment_id=experiment_id, tags=tags) as child:
        tracker = tracking.RunTracker(child.info.run_id)
        tracker.log_params({**cfg.to_params(), "d": d, "n": n, "lr": default_lr(d, n)})
        result = simulate_setting(cfg, d, n)
        tracker.pending = _metrics(result)
        if not tracker.flush():
            raise tracking.TrackingError(f"could not log the metrics of run {tracker.run_id}")
        if result.estimate.bound is not None:
            mlflow.set_tag("epsstar.bound", result.estimate.bound)
        mlflow.log_figure(plot([result], cfg), "figures/phase_transition.png")
    return result


def _tags() -> dict[str, str]:
    from epsstar import tracking

    commit = tracking.git_commit()
    return {tracking.TAG_ROLE: ROLE, **({tracking.TAG_GIT: commit} if commit else {})}


def _log_new_params(run_id: str, params: dict[str, Any]) -> None:
    """Log params the run does not have yet: ``mlflow run`` already logged the MLproject
    parameters, possibly spelled differently ("2, 5" vs "2,5"), and MLflow refuses to change a
    param."""
    from epsstar import tracking

    existing = tracking.client().get_run(run_id).data.params
    tracking.RunTracker(run_id).log_params({k: v for k, v in params.items() if k not in existing})


def _metrics(result: SettingResult) -> list[Metric]:
    """Curves (step = grid index) and scalars (step 0) as one batch; non-finite values (an
    open bracket end) are left out, since not every tracking store accepts them."""
    import time

    import numpy as np
    from mlflow.entities import Metric

    c = result.curves
    curves = {
        "log_eps_ratio": np.log10(c.eps / result.scale),
        "eps": c.eps,
        "pvalue_theta": c.pvalue_theta,
        "pvalue_loss": c.pvalue_loss,
        "traj_diff": c.traj_diff,
        "adv_train_loss": c.adv_train_loss,
    }
    now = int(time.time() * 1000)
    points = [(k, float(v), i) for k, values in curves.items() for i, v in enumerate(values)]
    points += [(k, float(v), 0) for k, v in result.summary().items()]
    return [Metric(k, v, now, step) for k, v, step in points if math.isfinite(v)]


# ---------------------------------------------------------------------------------------------
# reporting


def _epsstar_text(estimate: Estimate) -> str:
    bound = {None: "", "above": "> ", "below": "< "}[estimate.bound]
    value = estimate.upper if estimate.bound == "below" else estimate.epsstar
    return f"{bound}{value:.4g}"


def format_table(results: Sequence[SettingResult]) -> str:
    """d, n, √(d/n), ε*, ε*/√(d/n) and the number of search trials, one row per setting."""
    lines = [f"{'d':>5} {'n':>6} {'sqrt(d/n)':>10} {'eps*':>10} {'ratio':>8} {'trials':>6}"]
    for r in results:
        ratio = r.estimate.epsstar / r.scale
        lines.append(f"{r.d:>5} {r.n:>6} {r.scale:>10.4g} {_epsstar_text(r.estimate):>10} "
                     f"{ratio:>8.3g} {r.n_trials:>6}")
    return "\n".join(lines)


def table_csv(results: Sequence[SettingResult]) -> str:
    rows = ["d,n,sqrt_d_over_n,epsstar,epsstar_lower,epsstar_upper,bound,epsstar_ratio,n_trials"]
    for r in results:
        e = r.estimate
        rows.append(f"{r.d},{r.n},{r.scale:.6g},{e.epsstar:.6g},{e.lower:.6g},{e.upper:.6g},"
                    f"{e.bound or ''},{e.epsstar / r.scale:.6g},{r.n_trials}")
    return "\n".join(rows) + "\n"


def plot(results: Sequence[SettingResult], cfg: SimulateConfig) -> Figure:
    """The paper's Figures 2–3 for one or several settings (one colour each).

    (a) median p-values (θ solid, training loss dashed), (b) relative trajectory difference at
    the clean run's stopping step, (c) R̂(θ̂(ε), ε)/R*(0) with ε* dotted, all against
    log10(ε/√(d/n)); (d) the relative trajectory difference along the descent at
    ε/√(d/n) = 0.1, 1, 10. Matplotlib's object API (no pyplot): no global figure state.
    """
    import numpy as np
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    fig = Figure(figsize=(12, 8.5))
    fig.subplots_adjust(left=0.07, right=0.98, bottom=0.07, top=0.9, hspace=0.35, wspace=0.25)
    ax_p, ax_diff, ax_loss, ax_step = fig.subplots(2, 2).ravel()
    for i, res in enumerate(results):
        c, color, label = res.curves, f"C{i}", f"d={res.d}, n={res.n}"
        x = np.log10(c.eps / res.scale)
        ax_p.plot(x, c.pvalue_theta, color=color, label=label)
        ax_p.plot(x, c.pvalue_loss, color=color, ls="--")
        ax_diff.plot(x, c.traj_diff, color=color, label=label)
        ax_loss.plot(x, c.adv_train_loss / c.threshold, color=color, label=label)
        if res.estimate.bound is None:
            ax_loss.axvline(math.log10(res.estimate.epsstar / res.scale), color=color, ls=":")
        steps = np.arange(c.step_diff.shape[0])
        for ratio, ls in zip(STEP_RATIOS, ("-", "--", ":"), strict=True):
            j = int(np.argmin(np.abs(x - math.log10(ratio))))
            ax_step.plot(steps[1:], c.step_diff[1:, j], color=color, ls=ls)
    xlabel = "log10(ε / √(d/n))"
    ax_p.axhline(0.01, color="grey", lw=0.8)
    ax_p.set(yscale="log", ylim=(1e-8, 1.5), xlabel=xlabel, ylabel="median p-value",
             title="(a) p-value vs clean runs: θ̂ (solid), train loss (dashed)")
    ax_diff.set(yscale="log", xlabel=xlabel, ylabel="‖θ⁽ᵀ⁾(ε) − θ⁽ᵀ⁾(0)‖ / ‖θ⁽ᵀ⁾(0)‖",
                title="(b) trajectory difference at the clean run's best step T")
    ax_loss.axhline(1.0, color="grey", lw=0.8)
    ax_loss.set(xlabel=xlabel, ylabel="R̂(θ̂(ε), ε) / R*(0)",
                title="(c) adversarial train loss / R*(0); ε* dotted")
    ax_step.set(yscale="log", xlabel="gradient-descent step t",
                ylabel="‖θ⁽ᵗ⁾(ε) − θ⁽ᵗ⁾(0)‖ / ‖θ⁽ᵗ⁾(0)‖",
                title="(d) trajectory difference along the descent")
    ax_step.legend(handles=[Line2D([], [], color="k", ls=ls, label=f"ε/√(d/n) = {r:g}")
                            for r, ls in zip(STEP_RATIOS, ("-", "--", ":"), strict=True)],
                   fontsize="small")
    for ax in (ax_p, ax_diff, ax_loss):
        ax.legend(fontsize="small")
    fig.suptitle(f"Linear regression, {cfg.norm} attack: σ = {cfg.sigma:g}, "
                 f"{cfg.reps} data sets per setting")
    return fig
