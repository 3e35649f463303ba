"""An Optuna sampler that finds ε* in as few adversarial training runs as possible (SPEC §4).

Pure computation: numpy, scipy and optuna only (no torch, no MLflow).

Each trial is one adversarial training run at the ε the sampler picks; its value is the measured
adversarial training loss R̂(θ̂(ε), ε), increasing and close to linear in ε. ε* is where that
curve crosses ``threshold`` = R*(0). Units are the caller's (pixel units by convention,
8/255 ≈ 0.0314): every rule below is scale-free, written with ratios and relative widths.

How the next ε is chosen, from the completed trials only:

1. The completed runs are averaged per ε and made non-decreasing (isotonic fit), so one noisy
   pair of seeds cannot send the search the wrong way; the bracket is the largest ε at or below
   the threshold and the smallest ε above it.
2. No bracket yet: extrapolate the curve (the secant through the two runs nearest the crossing,
   or through the clean point (0, clean_train_loss), or through the origin for a single run)
   and aim a little past the predicted crossing, so the next run is likely to bracket it; the
   step is a geometric factor between 1.25 and 8 (a flat or noisy curve still makes progress).
3. Bracket found: safeguarded secant. The crossing is interpolated (a quadratic through a third
   run corrects for curvature); while the bracket spans more than a factor of 4 the step is
   kept inside the middle of the bracket in log ε, so a badly curved curve degrades to
   bisection in log ε rather than to a creeping regula falsi. Once the estimate is within the
   tolerance of one bracket end, the next run goes just past it on the other side ("closing"
   step), which collapses the bracket in one run; until then runs land a little off the
   estimate, towards the far end.
4. Stop when the bracket's relative width (upper − lower)/upper ≤ ``rtol``, after ``max_trials``
   completed runs, or when the crossing is shown to lie outside [eps_low, eps_high].

Stateless: the sampler writes the ε it picks into the trial's system attributes when the trial
starts, and derives everything else from ``study.get_trials()``. A restarted driver, a fresh
sampler object, or a second machine on the same storage continues the same search.

Several workers: every RUNNING (or enqueued) trial's ε counts as pending. A pending run is
assumed to come out as the current curve predicts ("believer"), and the next ε is planned on top
of that; if that belief would already end the search, the opposite outcome is assumed instead,
so the extra run pays off exactly when the prediction is wrong. No ε closer than 0.1·rtol
(relative) to a pending or completed one is ever proposed.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import optuna
from optuna.distributions import BaseDistribution, FloatDistribution
from optuna.samplers import BaseSampler
from optuna.study import Study
from optuna.trial import FrozenTrial, TrialState
from scipy.optimize import isotonic_regression

from epsstar.config import ConfigError
from epsstar.estimate import Estimate, interpolate_epsstar

# System attribute holding the ε a trial was given when it started: other workers read it
# while the trial is still RUNNING (before or without its ``suggest_float`` call).
EPS_ATTR = "epsstar:eps"

# ---- search constants (dimensionless; chosen with benchmarks/search_efficiency.py) ----
_MAX_STEP = 8.0  # largest factor between runs while unbracketed: 3 steps cross [0.1, 64]/255
_MIN_STEP = 1.25  # smallest such factor, so a flat or noisy extrapolation still makes progress
_OVERSHOOT = 0.25  # aim 25% past an extrapolated crossing so the next run likely brackets it
_WIDE = 4.0  # above this bracket ratio a step stays in the middle of the bracket in log ε
_WIDE_MARGIN = 0.15  # ... i.e. at least 15% of the log-width away from either end
_CLOSE = 0.9  # a closing run lands 0.9·rtol (relative) past the bracket end it pairs with
_HEDGE = 0.4  # an approaching run lands 0.4·rtol off the estimate, towards the far end
_DUPLICATE = 0.1  # two ε closer than 0.1·rtol (relative) count as the same run
_START_STEP = 4.0
_QUAD_SPREAD = 0.5
_QUAD_TRUST = 1.5
_PRIOR_SPREAD = 0.5
_OVERSHOOT_SPREAD = 1.0
_MARGIN = 0.25  # first run above ``lower_guess`` when no ``initial_guess`` is given

# Reasons the search is over, as returned by BisectionSampler.stop_reason.
CONVERGED = "converged"
MAX_TRIALS = "max_trials"
ABOVE_RANGE = "above_range"  # the run at eps_high is still at or below the threshold
BELOW_RANGE = "below_range"  # the run at eps_low is already above the threshold

# Settings stored as study user attributes by ``check_study`` (and compared on reuse).
_IDENTITY_KEYS = ("threshold", "param_name", "clean_train_loss")


@dataclass(frozen=True)
class _Settings:
    threshold: float  # R*(0)
    eps_low: float  # search range, ε units (> 0: the search works in log ε)
    eps_high: float
    rtol: float  # stop when (upper - lower) / upper <= rtol
    clean_train_loss: float | None  # the known point (0, clean_train_loss)
    lower_guess: float | None  # an ε believed to be <= ε*
    initial_guess: float | None  # where to run first
    max_trials: int | None


# --------------------------------------------------------------------------- the curve
@dataclass(frozen=True)
class _Curve:
    """R̂ against ε as seen through runs: one mean per ε, made non-decreasing (isotonic fit).

    ``eps`` may start with 0 (the clean point); it never holds duplicates.
    """

    eps: np.ndarray  # (m,) sorted distinct ε
    loss: np.ndarray  # (m,) non-decreasing fitted loss

    @classmethod
    def fit(cls, points: Sequence[tuple[float, float]]) -> _Curve:
        if not points:
            return cls(np.empty(0), np.empty(0))
        x, y = np.asarray(points, dtype=float).T
        xs, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
        means = np.bincount(inverse, weights=y) / counts
        if means.size > 1 and (np.diff(means) < 0).any():
            means = isotonic_regression(means, weights=counts, increasing=True).x
        return cls(xs, means)

    def bracket(self, threshold: float) -> tuple[float | None, float | None]:
        """(largest ε > 0 at or below ``threshold``, smallest ε above it); None when missing."""
        below = self.eps[(self.loss <= threshold) & (self.eps > 0)]
        above = self.eps[self.loss > threshold]
        return (float(below[-1]) if below.size else None, float(above[0]) if above.size else None)

    def predict(self, eps: float) -> float | None:
        """Piecewise-linear curve value at ``eps``, extended linearly past both ends."""
        if self.eps.size < 2:
            return None
        i = int(np.clip(np.searchsorted(self.eps, eps), 1, self.eps.size - 1))
        x0, x1, y0, y1 = self.eps[i - 1], self.eps[i], self.loss[i - 1], self.loss[i]
        return float(y0 + (y1 - y0) * (eps - x0) / (x1 - x0))

    def crossing(self, threshold: float) -> tuple[float, float] | None:
        """Predicted ε* and its relative uncertainty, or None when the curve gives no slope.

        The secant through the two runs nearest the crossing (the first bracketing pair, or the
        last/first two runs when the crossing is not bracketed), corrected by the quadratic
        through the nearest third run when that stays close; the correction's size stands in
        for the uncertainty. Without a third run the uncertainty grows with how far the secant
        reaches (or how wide the bracket is).
        """
        n = self.eps.size
        if n < 2:
            return None
        above = np.flatnonzero(self.loss > threshold)
        i = int(above[0]) if above.size else n  # first index above the threshold
        b = min(max(i, 1), n - 1)  # the runs (b - 1, b) are the nearest to the crossing
        linear = self._secant_root(b - 1, b, threshold)
        if linear is None:
            return None
        lo, hi = self.eps[b - 1], self.eps[b]
        window = (lo, hi) if 0 < i < n else (hi, math.inf) if i == n else (0.0, lo)
        quadratic = self._quadratic_root(b, threshold, window, linear)
        if quadratic is not None:
            return quadratic, _QUAD_SPREAD * abs(quadratic - linear) / quadratic
        if 0 < i < n:
            reach = math.log(hi / lo) if lo > 0 else 1.0
        else:
            reach = abs(math.log(linear / (hi if i == n else lo)))
        return linear, _PRIOR_SPREAD * min(reach, 1.0)

    def _secant_root(self, a: int, b: int, threshold: float) -> float | None:
        x0, x1, y0, y1 = self.eps[a], self.eps[b], self.loss[a], self.loss[b]
        if y1 <= y0:
            return None
        root = float(x0 + (threshold - y0) * (x1 - x0) / (y1 - y0))
        return root if root > 0 else None

    def _quadratic_root(
        self, b: int, threshold: float, window: tuple[float, float], linear: float
    ) -> float | None:
        """Root in ``window`` of the quadratic through runs b-1, b and the nearest third run,
        if it lies within a factor ``_QUAD_TRUST`` of the linear root."""
        third = [j for j in (b - 2, b + 1) if 0 <= j < self.eps.size]
        if not third:
            return None
        j = min(third, key=lambda k: abs(self.eps[k] - linear))
        idx = sorted((b - 1, b, j))
        coef = np.polyfit(self.eps[idx], self.loss[idx] - threshold, 2)
        roots = [
            r.real
            for r in np.roots(coef)
            if abs(r.imag) < 1e-9 * abs(r) and window[0] < r.real < window[1]
        ]
        if not roots:
            return None
        root = float(min(roots, key=lambda r: abs(r - linear)))
        return root if abs(math.log(root / linear)) <= math.log(_QUAD_TRUST) else None


# --------------------------------------------------------------------------- planning
def _search_over(
    points: Sequence[tuple[float, float]], s: _Settings, n_complete: int | None = None
) -> str | None:
    """Why the search is over given completed (ε, loss) results, or None while it goes on.

    ``n_complete`` (default: the number of points) is what ``max_trials`` is compared with.
    """
    clean = [] if s.clean_train_loss is None else [(0.0, s.clean_train_loss)]
    lo, hi = _Curve.fit([*points, *clean]).bracket(s.threshold)
    near = 1.0 + _DUPLICATE * s.rtol  # a run this close to a range end counts as at that end
    if lo is not None and hi is not None and (hi - lo) / hi <= s.rtol:
        return CONVERGED
    if hi is None and lo is not None and lo * near >= s.eps_high:
        return ABOVE_RANGE
    if hi is not None and lo is None and hi <= s.eps_low * near:
        return BELOW_RANGE
    n_complete = len(points) if n_complete is None else n_complete
    if s.max_trials is not None and n_complete >= s.max_trials:
        return MAX_TRIALS
    return None


def _model(points: Sequence[tuple[float, float]], s: _Settings) -> _Curve:
    """The curve used to predict: runs plus the clean point, or plus the origin for one run.

    Losses are ≥ 0, so with a single run and no clean point the line through the origin is a
    conservative guess: for a curve with positive intercept it lands between the run and ε*.
    """
    if s.clean_train_loss is not None:
        return _Curve.fit([*points, (0.0, s.clean_train_loss)])
    if len({eps for eps, _ in points}) == 1:
        return _Curve.fit([*points, (0.0, 0.0)])
    return _Curve.fit(points)


def _start(s: _Settings) -> float:
    if s.initial_guess is not None:
        return s.initial_guess
    if s.lower_guess is not None:
        return s.lower_guess * _START_STEP
    return math.sqrt(s.eps_low * s.eps_high)


def _grow(lo: float, estimate: tuple[float, float] | None) -> float:
    """Next ε above ``lo`` when every run so far is at or below the threshold."""
    if estimate is None or estimate[0] <= lo:
        return lo * _MAX_STEP
    root, spread = estimate
    aim = root * (1 + _OVERSHOOT + _OVERSHOOT_SPREAD * spread)
    return float(np.clip(aim, lo * _MIN_STEP, lo * _MAX_STEP))


def _shrink(hi: float, estimate: tuple[float, float] | None) -> float:
    """Next ε below ``hi`` when every run so far is above the threshold."""
    if estimate is None or estimate[0] >= hi:
        return hi / _MAX_STEP
    root, spread = estimate
    aim = root / (1 + _OVERSHOOT + _OVERSHOOT_SPREAD * spread)
    return float(np.clip(aim, hi / _MAX_STEP, hi / _MIN_STEP))


def _refine(lo: float, hi: float, estimate: tuple[float, float] | None, rtol: float) -> float:
    """Next ε inside the bracket (lo, hi)."""
    if estimate is None:  # no usable slope: plain bisection in log ε
        root, spread = math.sqrt(lo * hi), 1.0
    else:
        root, spread = min(max(estimate[0], lo), hi), estimate[1]
    if hi / lo > _WIDE:  # wide bracket: stay in its log-middle (bisection-like safeguard)
        span = math.log(hi / lo) * _WIDE_MARGIN
        return float(np.clip(root, lo * math.exp(span), hi * math.exp(-span)))
    margin = max(spread, _MARGIN * rtol)  # how far off the estimate may be
    close_up = lo / (1 - _CLOSE * rtol)  # an above result here closes the bracket
    close_down = hi * (1 - _CLOSE * rtol)  # a below result here closes it
    closing = []  # (distance from the estimate, ε) of the closing steps that look safe
    if close_up < hi and root * (1 + margin) <= close_up:
        closing.append((close_up / root, close_up))
    if close_down > lo and root / (1 + margin) >= close_down:
        closing.append((root / close_down, close_down))
    if closing:
        return max(closing)[1]
    hedge = 1 + _HEDGE * rtol
    step = root * hedge if hi / root > root / lo else root / hedge
    return float(np.clip(step, lo * (1 + _DUPLICATE * rtol), hi / (1 + _DUPLICATE * rtol)))


def _next_eps(points: Sequence[tuple[float, float]], s: _Settings) -> float:
    """The ε to run next given (ε, loss) results, real or believed (single-worker rule)."""
    lo, hi = _Curve.fit(points).bracket(s.threshold)
    if s.lower_guess is not None and (hi is None or s.lower_guess < hi):
        lo = max(lo or 0.0, s.lower_guess)
    estimate = _model(points, s).crossing(s.threshold)
    if lo is None and hi is None:
        eps = _start(s)
    elif hi is None:
        eps = _grow(lo, estimate)
    elif lo is None:
        eps = _shrink(hi, estimate)
    else:
        eps = _refine(lo, hi, estimate, s.rtol)
    return float(np.clip(eps, s.eps_low, s.eps_high))


def _believe(
    points: list[tuple[float, float]], pending: Sequence[float], s: _Settings, flip_last: bool
) -> list[tuple[float, float]]:
    """Add each pending ε with the loss the curve predicts for it (in the order they started).

    With ``flip_last`` the last pending run is assumed to land on the other side of the
    threshold instead. Pending runs the curve cannot predict yet are left out.
    """
    believed = list(points)
    for k, eps in enumerate(pending):
        loss = _model(believed, s).predict(eps)
        if loss is None:
            continue
        if flip_last and k == len(pending) - 1:
            loss = _mirror(loss, s.threshold)
        believed.append((eps, loss))
    return believed


def _mirror(loss: float, threshold: float) -> float:
    """The loss reflected to the other side of ``threshold`` (strictly above when at it)."""
    gap = max(abs(loss - threshold), 1e-9 * max(abs(threshold), 1.0))
    return threshold + gap if loss <= threshold else threshold - gap


def _plan(points: list[tuple[float, float]], pending: Sequence[float], s: _Settings) -> float:
    """The ε for a new trial, given completed (ε, loss) results and the ε of pending trials."""
    believed = _believe(points, pending, s, flip_last=False)
    if pending and _search_over(believed, s, n_complete=0) is not None:
        believed = _believe(points, pending, s, flip_last=True)
    eps = _next_eps(believed, s)
    return _avoid_duplicates(eps, [e for e, _ in points] + list(pending), s)


def _avoid_duplicates(eps: float, held: Sequence[float], s: _Settings) -> float:
    """``eps`` unless a held ε is within the duplicate distance; then the middle (in log ε) of
    the widest gap between held ε inside the range, which is always a new, informative run."""
    tol = _DUPLICATE * s.rtol
    if all(abs(eps - h) > tol * max(eps, h) for h in held):
        return eps
    edges = np.unique(np.clip([s.eps_low, s.eps_high, *held], s.eps_low, s.eps_high))
    gaps = np.diff(np.log(edges))
    j = int(np.argmax(gaps))
    return float(math.sqrt(edges[j] * edges[j + 1]))


# --------------------------------------------------------------------------- reading the study
def _held_eps(trial: FrozenTrial, param_name: str) -> float | None:
    """The ε a trial ran (or runs) at: its parameter, else the ε given at its start, else the
    ε it was enqueued with."""
    if param_name in trial.params:
        return float(trial.params[param_name])
    if EPS_ATTR in trial.system_attrs:
        return float(trial.system_attrs[EPS_ATTR])
    fixed = trial.system_attrs.get("fixed_params") or {}
    return float(fixed[param_name]) if param_name in fixed else None


def _read_trials(
    trials: Sequence[FrozenTrial],
    param_name: str,
    *,
    skip: int | None = None,
    finished: tuple[int, float] | None = None,
) -> tuple[list[tuple[float, float]], list[float]]:
    """Completed (ε, loss) results and the ε of pending (RUNNING/WAITING) trials, by start order.

    Failed and pruned trials, and completed ones with a non-finite loss, are ignored. ``skip``
    leaves out the trial being planned; ``finished`` = (number, loss) counts a trial that is
    finishing right now (Optuna stores its state only after ``after_trial``) as completed.
    """
    points: list[tuple[float, float]] = []
    pending: list[float] = []
    for t in sorted(trials, key=lambda t: t.number):
        eps = _held_eps(t, param_name)
        if eps is None or t.number == skip:
            continue
        if finished is not None and t.number == finished[0]:
            loss = finished[1]
        elif t.state == TrialState.COMPLETE and t.value is not None:
            loss = t.value
        else:
            if t.state in (TrialState.RUNNING, TrialState.WAITING):
                pending.append(eps)
            continue
        if math.isfinite(loss):
            points.append((eps, float(loss)))
    return points, pending


# --------------------------------------------------------------------------- the sampler
def _check_positive(name: str, value: float | None, *, allow_none: bool = True) -> None:
    if value is None and allow_none:
        return
    if value is None or not math.isfinite(value) or value <= 0:
        raise ConfigError(f"{name} must be a finite number > 0, got {value}")


def _validated(
    threshold: float,
    eps_low: float,
    eps_high: float,
    rtol: float,
    clean_train_loss: float | None,
    lower_guess: float | None,
    initial_guess: float | None,
    max_trials: int | None,
) -> _Settings:
    if not math.isfinite(threshold):
        raise ConfigError(f"threshold must be a finite number, got {threshold}")
    _check_positive("eps_low (the search works in log eps)", eps_low, allow_none=False)
    _check_positive("eps_high", eps_high, allow_none=False)
    if eps_low >= eps_high:
        raise ConfigError(f"need eps_low < eps_high, got {eps_low:g} >= {eps_high:g}")
    if not (math.isfinite(rtol) and 0 < rtol < 1):
        raise ConfigError(f"rtol must be in (0, 1), got {rtol}")
    if clean_train_loss is not None and not math.isfinite(clean_train_loss):
        raise ConfigError(f"clean_train_loss must be a finite number, got {clean_train_loss}")
    for name, guess in (("lower_guess", lower_guess), ("initial_guess", initial_guess)):
        _check_positive(name, guess)
        if guess is not None and not eps_low <= guess <= eps_high:
            raise ConfigError(
                f"{name} {guess:g} lies outside the search range [{eps_low:g}, {eps_high:g}]"
            )
    if max_trials is not None and (isinstance(max_trials, bool) or int(max_trials) != max_trials
                                   or max_trials < 1):
        raise ConfigError(f"max_trials must be an integer >= 1, got {max_trials}")
    return _Settings(
        float(threshold), float(eps_low), float(eps_high), float(rtol),
        None if clean_train_loss is None else float(clean_train_loss),
        None if lower_guess is None else float(lower_guess),
        None if initial_guess is None else float(initial_guess),
        None if max_trials is None else int(max_trials),
    )


def _request_stop(study: Study) -> None:
    """Ask ``study.optimize`` to return after the running trials."""
    try:
        study.stop()
    except RuntimeError:
        # Optuna allows stop() only inside optimize(); ask-and-tell drivers poll stop_reason().
        pass


class BisectionSampler(BaseSampler):
    """Proposes the ε of each adversarial training run so that ε* is found in few runs.

    The objective must suggest ``param_name`` with ``trial.suggest_float(param_name, eps_low,
    eps_high)`` (``log=True`` or not) and return the run's adversarial training loss
    R̂(θ̂(ε), ε); a NaN return marks the trial FAILED and it is ignored. The search and its
    stopping rules are described in the module docstring. Once it is over,
    ``study.optimize`` returns (``study.stop()``); a trial asked after that is pruned at its
    ``suggest_float`` call, before any training. Ask-and-tell drivers check
    :meth:`stop_reason` before asking.

    Args:
        threshold: R*(0), the clean model's clean test loss; ε* is where the loss crosses it.
        eps_low: smallest ε the search may run, in the objective's ε units (pixel units by
            convention, e.g. 0.1/255); > 0 because the search works in log ε.
        eps_high: largest ε the search may run, same units.
        rtol: stop once the bracket (largest ε at or below the threshold, smallest above it)
            has relative width (upper - lower) / upper <= rtol.
        clean_train_loss: the clean run's training loss, used as the known point (0, ·) from
            the first proposal on (and by :func:`estimate_from_study` once recorded).
        lower_guess: an ε believed to be <= ε* (e.g. where the clean model's attacked training
            loss reaches the threshold); no run is proposed below it unless a run contradicts it.
        initial_guess: where to run first (e.g. the fine-tuning extrapolation of SPEC §5).
            Default: ``lower_guess`` × 4, else the geometric middle of the range.
        max_trials: stop after this many completed runs.
        param_name: the name of the ε parameter.
        seed: seeds the random sampler that draws any parameter other than ``param_name``;
            the ε proposals themselves are deterministic.

    Raises:
        ConfigError: on a non-finite threshold, eps_low <= 0, eps_low >= eps_high, rtol
            outside (0, 1), a guess outside the range, or max_trials < 1.

    Example:
        >>> import optuna
        >>> optuna.logging.set_verbosity(optuna.logging.WARNING)
        >>> sampler = BisectionSampler(
        ...     threshold=0.441, eps_low=0.1 / 255, eps_high=64 / 255, clean_train_loss=0.0403
        ... )
        >>> study = optuna.create_study(direction="minimize", sampler=sampler)
        >>> sampler.check_study(study)  # records threshold etc. as study user attrs
        >>> def objective(trial):  # stand-in for one adversarial training run
        ...     eps = trial.suggest_float("eps", 0.1 / 255, 64 / 255, log=True)
        ...     return 0.0403 + 0.1205 * eps * 255
        >>> study.optimize(objective, n_trials=20)
        >>> sampler.stop_reason(study), len(study.trials)
        ('converged', 3)
        >>> round(estimate_from_study(study).epsstar * 255, 2)
        3.33
    """

    def __init__(
        self,
        threshold: float,
        eps_low: float,
        eps_high: float,
        rtol: float = 0.05,
        *,
        clean_train_loss: float | None = None,
        lower_guess: float | None = None,
        initial_guess: float | None = None,
        max_trials: int | None = None,
        param_name: str = "eps",
        seed: int | None = None,
    ) -> None:
        self._settings = _validated(
            threshold, eps_low, eps_high, rtol, clean_train_loss, lower_guess, initial_guess,
            max_trials,
        )
        if not isinstance(param_name, str) or not param_name:
            raise ConfigError(f"param_name must be a non-empty string, got {param_name!r}")
        self.param_name = param_name
        self._others = optuna.samplers.RandomSampler(seed=seed)

    # ---------------------------------------------------------------- public helpers
    def describe(self) -> dict[str, Any]:
        """The settings, JSON-ready, as they are stored in the study's user attributes."""
        return {**dataclasses.asdict(self._settings), "param_name": self.param_name,
                "sampler": type(self).__name__}

    def check_study(self, study: Study) -> None:
        """Refuse a study searched with another threshold, ε name or clean loss; record ours.

        Raises:
            ConfigError: when the study's stored settings differ (see :func:`ensure_compatible`).
        """
        settings = self.describe()
        ensure_compatible(
            study, settings["threshold"], **{k: settings[k] for k in _IDENTITY_KEYS[1:]}
        )
        for key, value in settings.items():
            if study.user_attrs.get(key, _MISSING) != value:
                study.set_user_attr(key, value)

    def stop_reason(self, study: Study) -> str | None:
        """Why the search is over (``"converged"``, ``"max_trials"``, ``"above_range"``,
        ``"below_range"``), or None while more runs are needed."""
        return self._stop_reason(study.get_trials(deepcopy=False))

    # ---------------------------------------------------------------- Optuna hooks
    def infer_relative_search_space(
        self, study: Study, trial: FrozenTrial
    ) -> dict[str, BaseDistribution]:
        return {}

    def sample_relative(
        self, study: Study, trial: FrozenTrial, search_space: dict[str, BaseDistribution]
    ) -> dict[str, Any]:
        return {}

    def before_trial(self, study: Study, trial: FrozenTrial) -> None:
        # Pick ε as soon as the trial exists and store it where every worker reads it, so a
        # second worker asking now plans around it (GridSampler does the same with grid_id).
        self._raise_error_if_multi_objective(study)
        if EPS_ATTR in trial.system_attrs:
            return
        fixed = trial.system_attrs.get("fixed_params") or {}
        if self.param_name in fixed:  # enqueued with a given ε: announce it to the others
            _store_eps(study, trial, float(fixed[self.param_name]))
            return
        trials = study.get_trials(deepcopy=False)
        if self._stop_reason(trials) is None:
            _store_eps(study, trial, self._plan(trials, trial.number))

    def sample_independent(
        self,
        study: Study,
        trial: FrozenTrial,
        param_name: str,
        param_distribution: BaseDistribution,
    ) -> Any:
        if param_name != self.param_name:
            return self._others.sample_independent(study, trial, param_name, param_distribution)
        if not isinstance(param_distribution, FloatDistribution) or param_distribution.step:
            raise ConfigError(f"{param_name} must be suggested with suggest_float (no step)")
        trials = study.get_trials(deepcopy=False)
        eps = trial.system_attrs.get(EPS_ATTR)
        if eps is None or _taken_before(trials, trial.number, float(eps), self):
            reason = self._stop_reason(trials)
            if reason is not None:
                _request_stop(study)
                raise optuna.TrialPruned(f"the eps* search is over ({reason})")
            eps = self._plan(trials, trial.number)
            _store_eps(study, trial, eps)
        return float(np.clip(eps, param_distribution.low, param_distribution.high))

    def after_trial(
        self,
        study: Study,
        trial: FrozenTrial,
        state: TrialState,
        values: Sequence[float] | None,
    ) -> None:
        if state != TrialState.COMPLETE or values is None:
            return
        trials = study.get_trials(deepcopy=False)
        if self._stop_reason(trials, finished=(trial.number, values[0])) is not None:
            _request_stop(study)

    def reseed_rng(self) -> None:
        self._others.reseed_rng()

    # ---------------------------------------------------------------- internals
    def _stop_reason(
        self, trials: Sequence[FrozenTrial], finished: tuple[int, float] | None = None
    ) -> str | None:
        points, _ = _read_trials(trials, self.param_name, finished=finished)
        return _search_over(points, self._settings)

    def _plan(self, trials: Sequence[FrozenTrial], number: int) -> float:
        points, pending = _read_trials(trials, self.param_name, skip=number)
        return _plan(points, pending, self._settings)


_MISSING = object()


def _store_eps(study: Study, trial: FrozenTrial, eps: float) -> None:
    study._storage.set_trial_system_attr(trial._trial_id, EPS_ATTR, eps)


def _taken_before(
    trials: Sequence[FrozenTrial], number: int, eps: float, sampler: BisectionSampler
) -> bool:
    """True when an earlier trial holds (about) the same ε: two workers planned at the same
    instant without seeing each other; the later one plans again."""
    tol = _DUPLICATE * sampler._settings.rtol
    for t in trials:
        held = _held_eps(t, sampler.param_name)
        if t.number < number and held is not None and t.state != TrialState.FAIL:
            if abs(held - eps) <= tol * max(held, eps):
                return True
    return False


# --------------------------------------------------------------------------- study records
def study_settings(study: Study) -> dict[str, Any]:
    """The sampler settings recorded in a study's user attributes (empty for a fresh study)."""
    keys = {f.name for f in dataclasses.fields(_Settings)} | {"param_name", "sampler"}
    return {k: v for k, v in study.user_attrs.items() if k in keys}


def ensure_compatible(study: Study, threshold: float, **extra: Any) -> None:
    """Raise ConfigError unless the study was created for the same threshold (and ``extra``).

    Only keys already stored in the study's user attributes are compared, so a fresh study is
    always compatible. Floats compare with a relative tolerance of 1e-9 (JSON round trips).

    Example:
        >>> import optuna
        >>> study = optuna.create_study()
        >>> study.set_user_attr("threshold", 0.441)
        >>> ensure_compatible(study, 0.441, norm="linf")  # norm not stored yet: fine
        >>> ensure_compatible(study, 0.5)
        Traceback (most recent call last):
        ...
        epsstar.config.ConfigError: study ... was searched with threshold=0.441, not 0.5; ...
    """
    stored = study.user_attrs
    for key, value in {"threshold": threshold, **extra}.items():
        if key in stored and not _same(stored[key], value):
            raise ConfigError(
                f"study {study.study_name!r} was searched with {key}={stored[key]!r}, "
                f"not {value!r}; use a new study name"
            )


def _same(a: Any, b: Any) -> bool:
    numbers = (int, float)
    if isinstance(a, numbers) and isinstance(b, numbers) and not isinstance(a, bool):
        return math.isclose(float(a), float(b), rel_tol=1e-9, abs_tol=0.0)
    return a == b


def estimate_from_study(
    study: Study, threshold: float | None = None, *, clean_train_loss: float | None = None
) -> Estimate:
    """ε* from a study's completed trials (SPEC §3: first bracketing pair, isotonic if needed).

    Args:
        study: a study searched with :class:`BisectionSampler` (or any study whose trials
            hold the ε parameter and the loss as their value).
        threshold: R*(0); default: the study's ``threshold`` user attribute.
        clean_train_loss: the clean point (0, ·); default: the study's ``clean_train_loss``
            user attribute, if any.

    Returns:
        The :class:`~epsstar.estimate.Estimate` in the trials' ε units: ``lower``/``upper`` is
        the bracket, ``bound`` is ``"above"`` (ε* > the largest tried ε) or ``"below"``
        (ε* < the smallest) when the crossing lies outside the tried range. Failed trials and
        non-finite losses are ignored; runs repeated at one ε are averaged.

    Raises:
        ConfigError: without a threshold, or when no trial has completed.
    """
    attrs = study.user_attrs
    if threshold is None:
        if attrs.get("threshold") is None:
            raise ConfigError(
                f"study {study.study_name!r} records no threshold; pass threshold= explicitly"
            )
        threshold = float(attrs["threshold"])
    if clean_train_loss is None:
        clean_train_loss = attrs.get("clean_train_loss")
    param_name = attrs.get("param_name", "eps")
    points, _ = _read_trials(study.get_trials(deepcopy=False), param_name)
    if not points:
        raise ConfigError(f"study {study.study_name!r} has no completed trial to estimate from")
    eps, losses = zip(*points, strict=True)
    return interpolate_epsstar(eps, losses, threshold, clean_train_loss=clean_train_loss)
