"""An Optuna sampler that finds ε* in as few adversarial training runs as possible (SPEC §4).

Pure computation: numpy, scipy and optuna only (no torch, no MLflow).

Each trial is one adversarial training run at the ε the sampler picks; its value is the measured
adversarial training loss R̂(θ̂(ε), ε), increasing and close to linear in ε. ε* is where that
curve crosses ``threshold`` = R*(0). Units are the caller's (pixel units by convention,
8/255 ≈ 0.0314): every rule below is scale-free, written with ratios and relative widths.

How the next ε is chosen, from the completed trials only:

1. Runs are averaged per ε and made non-decreasing (isotonic fit, the clean point included when
   known), so one noisy pair of runs cannot send the search the wrong way. The bracket is the
   largest ε at or below the threshold and the smallest ε above it.
2. No bracket yet: extrapolate the curve (the secant through the two runs nearest the crossing;
   with one run, the line through the clean point (0, clean_train_loss), or through the origin
   when that is unknown) and aim a little past the predicted crossing, by more the less the
   prediction is trusted, so the next run probably brackets it. Each such step changes ε by a
   factor between 1.25 and 8, so a flat or noisy extrapolation still makes progress.
3. Bracket found: safeguarded secant. The crossing is interpolated in the bracketing pair and
   corrected by the quadratic through a third run (curvature). When the estimate is close
   enough to one bracket end, the next run goes just past the tolerance on the other side: if
   it lands there the bracket collapses to within ``rtol`` in one run ("closing" run).
   Otherwise the run lands 0.4·rtol from the estimate, towards the far end ("approach" run).
   Brent's rule guards against regula falsi's creeping: if the last two runs did not halve the
   bracket in log ε, the next run bisects it in log ε.
4. Stop when the bracket's relative width (upper − lower)/upper ≤ ``rtol``, after ``max_trials``
   completed runs, or when the crossing is shown to lie outside [eps_low, eps_high] (a run at
   eps_high still at or below the threshold, or one at eps_low already above it).

Stateless: the sampler writes the ε it picks into the trial's system attributes when the trial
starts, and derives everything else from ``study.get_trials()``. A restarted driver, a fresh
sampler object, or a second machine on the same storage continues the same search.

Several workers: every RUNNING (or enqueued) trial's ε counts as pending.

- No run completed yet (nothing predicts the pending runs): the new run goes where the
  one-worker search would go after the likelier outcome of the pending ones, i.e. into the
  widest part (log ε) of the range they leave: ×8 above the start on a second worker.
- A bracket with pending runs inside: the new run splits the bracket together with them, at
  the ε that most likely leaves ε* in a part within rtol, with ε* believed near the estimate
  (a normal in log ε) but possibly anywhere in the bracket.
- Otherwise a pending run is assumed to come out as the curve predicts it ("believer", as in
  batch Bayesian optimisation) and the next ε is planned on top of that; if that belief would
  already end the search, the opposite outcome is assumed.

No ε closer than 0.1·rtol (relative) to a pending or completed one is proposed. Two trials that
planned at the same instant without seeing each other get the same ε; the later-numbered one
waits (at most ``_WAIT_S``) until every earlier RUNNING trial has stored its ε, sees the
duplicate and plans again.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any

import numpy as np
import optuna
from optuna.distributions import BaseDistribution, FloatDistribution
from optuna.samplers import BaseSampler
from optuna.study import Study
from optuna.trial import FrozenTrial, TrialState
from scipy.optimize import isotonic_regression
from scipy.special import ndtr

from epsstar.config import ConfigError
from epsstar.estimate import Estimate, interpolate_epsstar

# System attribute holding the ε a trial was given when it started: other workers read it
# while the trial is still RUNNING, before (or without) its ``suggest_float`` call.
EPS_ATTR = "epsstar:eps"

# Reasons the search is over, as returned by BisectionSampler.stop_reason.
CONVERGED = "converged"
MAX_TRIALS = "max_trials"
ABOVE_RANGE = "above_range"  # the run at eps_high is still at or below the threshold
BELOW_RANGE = "below_range"  # the run at eps_low (or the clean run) is above the threshold

# ---- search constants: dimensionless, chosen on the curves of benchmarks/search.md ----
_MAX_STEP = 8.0  # largest factor between runs while unbracketed (2 steps: mid to end of range)
_MIN_STEP = 1.25  # smallest such factor, so a flat or noisy extrapolation still makes progress
_START_STEP = 4.0  # first run at lower_guess × 4 when no initial_guess is given
_OVERSHOOT = 0.1  # aim 10% (+ the estimate's spread) past an extrapolated crossing
_PRIOR_SPREAD = 0.5  # spread of a secant estimate: 0.5 × how far it reaches, in log ε (≤ 1)
_QUAD_SPREAD = 0.5  # spread of a quadratic estimate: 0.5 × its gap to the secant estimate
_QUAD_TRUST = 1.5  # a quadratic root more than ×1.5 away from the secant root is not used
_MARGIN = 0.25  # a closing run needs the estimate max(spread, 0.25·rtol) inside the tolerance
_CLOSE = 0.9  # a closing run lands 0.9·rtol (relative) past the bracket end it pairs with
_HEDGE = 0.4  # an approach run lands 0.4·rtol off the estimate, towards the far end
_DUPLICATE = 0.1  # two ε closer than 0.1·rtol (relative) count as the same run
_UNIFORM = 0.2  # share of the belief in ε* spread evenly over the bracket, in case the
# estimate is wrong (the rest is a normal in log ε around the estimate)
_WIDTH_WEIGHT = 0.1  # weight of a part's width against the chance it is still open
_GRID = 64  # log-spaced candidate ε per parallel plan, besides the closing runs
_WAIT_S = 5.0  # longest a trial waits for earlier trials to store their ε (seconds)
_POLL_S = 0.05  # how often it looks meanwhile (seconds)

# Settings that must match for two samplers to share a study (see BisectionSampler.check_study).
_IDENTITY_KEYS = ("threshold", "param_name", "clean_train_loss")

Points = Sequence[tuple[float, float]]  # (ε, loss) of completed runs, in start order


@dataclass(frozen=True)
class _Settings:
    threshold: float  # R*(0)
    eps_low: float  # search range, ε units; > 0 because the search works in log ε
    eps_high: float
    rtol: float  # stop when (upper - lower) / upper <= rtol
    clean_train_loss: float | None  # the known point (0, clean_train_loss)
    lower_guess: float | None  # an ε believed to be <= ε*
    initial_guess: float | None  # where to run first
    max_trials: int | None  # stop after this many completed runs


def _positive(name: str, value: float | None) -> float | None:
    if value is not None and not (math.isfinite(value) and value > 0):
        raise ConfigError(f"{name} must be a finite number > 0, got {value}")
    return None if value is None else float(value)


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
    """Check the user's settings; raise ConfigError with a one-line message on the first fault."""
    if not math.isfinite(threshold):
        raise ConfigError(f"threshold must be a finite number, got {threshold}")
    if eps_low is None or eps_high is None:
        raise ConfigError("eps_low and eps_high are required")
    _positive("eps_low (the search works in log eps)", eps_low)
    _positive("eps_high", eps_high)
    if eps_low >= eps_high:
        raise ConfigError(f"need eps_low < eps_high, got {eps_low:g} >= {eps_high:g}")
    if not (math.isfinite(rtol) and 0 < rtol < 1):
        raise ConfigError(f"rtol must be in (0, 1), got {rtol}")
    if clean_train_loss is not None and not math.isfinite(clean_train_loss):
        raise ConfigError(f"clean_train_loss must be a finite number, got {clean_train_loss}")
    for name, guess in (("lower_guess", lower_guess), ("initial_guess", initial_guess)):
        if _positive(name, guess) is not None and not eps_low <= guess <= eps_high:
            raise ConfigError(
                f"{name} {guess:g} lies outside the search range [{eps_low:g}, {eps_high:g}]"
            )
    if max_trials is not None and (
        isinstance(max_trials, bool) or int(max_trials) != max_trials or max_trials < 1
    ):
        raise ConfigError(f"max_trials must be an integer >= 1, got {max_trials}")
    return _Settings(
        threshold=float(threshold),
        eps_low=float(eps_low),
        eps_high=float(eps_high),
        rtol=float(rtol),
        clean_train_loss=None if clean_train_loss is None else float(clean_train_loss),
        lower_guess=_positive("lower_guess", lower_guess),
        initial_guess=_positive("initial_guess", initial_guess),
        max_trials=None if max_trials is None else int(max_trials),
    )


# --------------------------------------------------------------------------- the curve
@dataclass(frozen=True)
class _Curve:
    """R̂ against ε as seen through runs: one mean per ε, made non-decreasing (isotonic fit).

    ``eps`` may start with 0 (the clean point); it holds no duplicates.
    """

    eps: np.ndarray  # (m,) sorted distinct ε
    loss: np.ndarray  # (m,) non-decreasing fitted loss

    @classmethod
    def fit(cls, points: Points) -> _Curve:
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
        above = self.eps[(self.loss > threshold) & (self.eps > 0)]
        return (float(below[-1]) if below.size else None, float(above[0]) if above.size else None)

    def predict(self, eps: float) -> float | None:
        """Piecewise-linear curve value at ``eps``, extended linearly past both ends."""
        if self.eps.size < 2:
            return None
        i = int(np.clip(np.searchsorted(self.eps, eps), 1, self.eps.size - 1))
        x0, x1, y0, y1 = self.eps[i - 1], self.eps[i], self.loss[i - 1], self.loss[i]
        return float(y0 + (y1 - y0) * (eps - x0) / (x1 - x0))

    def crossing(self, threshold: float) -> tuple[float, float] | None:
        """Predicted ε* and its relative uncertainty ("spread"); None when there is no slope.

        The secant through the two runs nearest the crossing (the first bracketing pair, or the
        last/first two runs when the crossing is not bracketed), corrected by the quadratic
        through the nearest third run; half their gap is the spread. Without a usable third run
        the spread grows with how far the secant reaches (or how wide the bracket is).
        """
        n = self.eps.size
        if n < 2:
            return None
        above = np.flatnonzero(self.loss > threshold)
        i = int(above[0]) if above.size else n  # first index above the threshold
        b = min(max(i, 1), n - 1)  # runs b - 1 and b are the nearest to the crossing
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
        """Root in ``window`` of the quadratic through runs b - 1, b and the third run nearest
        the secant root, when it lies within a factor ``_QUAD_TRUST`` of that root."""
        third = [j for j in (b - 2, b + 1) if 0 <= j < self.eps.size]
        if not third:
            return None
        j = min(third, key=lambda k: abs(self.eps[k] - linear))
        idx = sorted((b - 1, b, j))
        coef = np.polyfit(self.eps[idx], self.loss[idx] - threshold, 2)
        roots = [
            r.real
            for r in np.roots(coef)
            if abs(r.imag) <= 1e-9 * abs(r) and window[0] < r.real < window[1]
        ]
        if not roots:
            return None
        root = float(min(roots, key=lambda r: abs(r - linear)))
        return root if abs(math.log(root / linear)) <= math.log(_QUAD_TRUST) else None


def _observed(points: Points, s: _Settings) -> _Curve:
    """The runs as a curve, with the clean point when it is known (as estimate_from_study)."""
    clean = [] if s.clean_train_loss is None else [(0.0, s.clean_train_loss)]
    return _Curve.fit([*points, *clean])


def _model(points: Points, s: _Settings) -> _Curve:
    """The curve used for predictions: :func:`_observed`, plus the origin for a lone run.

    Losses are ≥ 0, so with one run and no clean point the line through the origin is a
    cautious guess: for a curve with a positive intercept it lands between the run and ε*.
    """
    if s.clean_train_loss is None and len({eps for eps, _ in points}) == 1:
        return _Curve.fit([*points, (0.0, 0.0)])
    return _observed(points, s)


# --------------------------------------------------------------------------- planning
def _search_over(points: Points, s: _Settings, n_complete: int | None = None) -> str | None:
    """Why the search is over given completed (ε, loss) results, or None while it goes on.

    ``n_complete`` (default: the number of points) is what ``max_trials`` is compared with.
    """
    if s.clean_train_loss is not None and s.clean_train_loss > s.threshold:
        return BELOW_RANGE  # already above at ε = 0 (no generalisation gap): nothing to run
    lo, hi = _observed(points, s).bracket(s.threshold)
    near = 1.0 + _DUPLICATE * s.rtol  # a run this close to a range end counts as at that end
    if lo is not None and hi is not None and (hi - lo) / hi <= s.rtol:
        return CONVERGED
    if hi is None and lo is not None and lo * near >= s.eps_high:
        return ABOVE_RANGE
    if lo is None and hi is not None and hi <= s.eps_low * near:
        return BELOW_RANGE
    n_complete = len(points) if n_complete is None else n_complete
    if s.max_trials is not None and n_complete >= s.max_trials:
        return MAX_TRIALS
    return None


def _start(s: _Settings) -> float:
    if s.initial_guess is not None:
        return s.initial_guess
    if s.lower_guess is not None:
        return s.lower_guess * _START_STEP
    return math.sqrt(s.eps_low * s.eps_high)


def _grow(lo: float, estimate: tuple[float, float] | None) -> float:
    """Next ε above ``lo`` when no run so far is above the threshold."""
    if estimate is None or estimate[0] <= lo:
        return lo * _MAX_STEP
    root, spread = estimate
    return float(np.clip(root * (1 + _OVERSHOOT + spread), lo * _MIN_STEP, lo * _MAX_STEP))


def _shrink(hi: float, estimate: tuple[float, float] | None) -> float:
    """Next ε below ``hi`` when every run so far is above the threshold."""
    if estimate is None or estimate[0] >= hi:
        return hi / _MAX_STEP
    root, spread = estimate
    return float(np.clip(root / (1 + _OVERSHOOT + spread), hi / _MAX_STEP, hi / _MIN_STEP))


def _refine(lo: float, hi: float, estimate: tuple[float, float] | None, rtol: float) -> float:
    """Next ε inside the bracket (lo, hi): a closing run if it looks safe, else an approach."""
    if estimate is None:  # no usable slope: bisect in log ε
        return math.sqrt(lo * hi)
    root, spread = min(max(estimate[0], lo), hi), estimate[1]
    margin = max(spread, _MARGIN * rtol)  # how far off the estimate may be
    close_up = lo / (1 - _CLOSE * rtol)  # an above result here closes the bracket
    close_down = hi * (1 - _CLOSE * rtol)  # a below result here closes it
    closing = []  # (relative distance from the estimate, ε) of the closing runs that look safe
    if close_up < hi and root * (1 + margin) <= close_up:
        closing.append((close_up / root, close_up))
    if close_down > lo and root / (1 + margin) >= close_down:
        closing.append((root / close_down, close_down))
    if closing:
        return max(closing)[1]
    hedge = 1 + _HEDGE * rtol
    step = root * hedge if hi / root > root / lo else root / hedge
    return float(np.clip(step, lo * (1 + _DUPLICATE * rtol), hi / (1 + _DUPLICATE * rtol)))


def _log_width(points: Points, s: _Settings) -> float:
    lo, hi = _observed(points, s).bracket(s.threshold)
    return math.log(hi / lo) if lo is not None and hi is not None else math.inf


def _stalled(points: Points, s: _Settings) -> bool:
    """True when the last two runs (in start order) did not halve the bracket in log ε.

    That is regula falsi's failure mode on a strongly curved curve: creeping up on the crossing
    from one side while the far end never moves. The next run then bisects (Brent's rule).
    """
    if len(points) < 3:
        return False
    before = _log_width(points[:-2], s)
    return math.isfinite(before) and _log_width(points, s) > 0.5 * before


def _next_eps(points: Points, s: _Settings, *, stalled: bool) -> float:
    """The ε to run next given (ε, loss) results, real or believed (the one-worker rule)."""
    lo, hi = _observed(points, s).bracket(s.threshold)
    if lo is None and hi is None:
        return _start(s)
    if s.lower_guess is not None and (hi is None or s.lower_guess < hi):
        lo = max(lo or 0.0, s.lower_guess)  # trusted until a run above contradicts it
    estimate = _model(points, s).crossing(s.threshold)
    if hi is None:
        eps = _grow(lo, estimate)
    elif lo is None:
        eps = _shrink(hi, estimate)
    elif stalled:
        eps = math.sqrt(lo * hi)
    else:
        eps = _refine(lo, hi, estimate, s.rtol)
    return float(np.clip(eps, s.eps_low, s.eps_high))


def _mirror(loss: float, threshold: float) -> float:
    """The loss reflected to the other side of ``threshold`` (strictly above when at it)."""
    gap = max(abs(loss - threshold), 1e-9 * max(abs(threshold), 1.0))
    return threshold + gap if loss <= threshold else threshold - gap


def _believe(
    points: Points, pending: Sequence[float], s: _Settings, *, flip_last: bool
) -> list[tuple[float, float]]:
    """``points`` plus each pending ε with the loss the curve predicts for it, in start order.

    With ``flip_last`` the last pending run is assumed to land on the other side of the
    threshold instead. Pending runs the curve cannot predict yet (no slope) are left out.
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


def _avoid_duplicates(
    eps: float, held: Sequence[float], within: tuple[float, float], s: _Settings
) -> float:
    """``eps`` unless a held ε is within the duplicate distance; then the log-middle of the
    widest gap between held ε inside ``within`` (the bracket, else the range): a new run that
    still narrows the search."""
    tol = _DUPLICATE * s.rtol
    if all(abs(eps - h) > tol * max(eps, h) for h in held):
        return eps
    lo, hi = within
    edges = np.unique([lo, hi, *(h for h in held if lo < h < hi)])
    j = int(np.argmax(np.diff(np.log(edges))))
    return float(math.sqrt(edges[j] * edges[j + 1]))


def _first_round(pending: Sequence[float], s: _Settings) -> float:
    """The ε for a new run while runs are pending but none has completed (nothing to predict
    them with): the next level of the one-worker decision tree.

    The pending ε cut the range [lower_guess or eps_low, eps_high] into parts; the likelier
    part holds ε*, taken as the widest in log ε. The new run goes where the one-worker search
    would go if ε* were there: an unpredicted step up (×8) past the highest pending run, one
    down below the lowest, or the log-middle between two. Ties go up: with the default start
    in the log-middle of the range, the second run then brackets any ε* up to 8× the start.
    """
    floor = s.lower_guess or s.eps_low
    near = 1.0 + _DUPLICATE * s.rtol  # a run this close to an end counts as at that end
    xs = sorted(set(pending))
    parts = []  # (log width of the part, the run the one-worker search makes there)
    if xs[-1] * near < s.eps_high:
        parts.append((math.log(s.eps_high / xs[-1]), min(_grow(xs[-1], None), s.eps_high)))
    if xs[0] > floor * near:
        down = math.sqrt(floor * xs[0]) if s.lower_guess else _shrink(xs[0], None)
        parts.append((math.log(xs[0] / floor), max(down, s.eps_low)))
    parts += [(math.log(b / a), math.sqrt(a * b)) for a, b in zip(xs, xs[1:], strict=False)]
    if not parts:
        return _start(s)  # the pending runs cover the range: _avoid_duplicates picks a gap
    widest = max(width for width, _ in parts)
    return next(eps for width, eps in parts if width >= widest * (1 - 1e-9))


def _belief_cdf(
    lo: float, hi: float, estimate: tuple[float, float] | None, rtol: float
) -> Callable[[np.ndarray], np.ndarray]:
    """P(ε* <= ε) for ε in [lo, hi] (the bracket): a normal in log ε around the estimate (sd =
    its spread, at least rtol), truncated to the bracket, mixed with a share ``_UNIFORM`` spread
    evenly in log ε."""
    a, b = math.log(lo), math.log(hi)

    def uniform(u: np.ndarray) -> np.ndarray:
        return (u - a) / (b - a)

    if estimate is None:
        return lambda eps: uniform(np.log(eps))
    mean = math.log(min(max(estimate[0], lo), hi))
    sd = max(estimate[1], rtol)
    floor, top = ndtr((a - mean) / sd), ndtr((b - mean) / sd)

    def cdf(eps: np.ndarray) -> np.ndarray:
        u = np.log(eps)
        normal = (ndtr((u - mean) / sd) - floor) / (top - floor)
        return (1 - _UNIFORM) * normal + _UNIFORM * uniform(u)

    return cdf


def _expected_cost(
    edges: np.ndarray, cdf: Callable[[np.ndarray], np.ndarray], rtol: float
) -> float:
    """How bad runs at the sorted ``edges`` (bracket ends included) leave the search: the chance
    that the part holding ε* is still wider than rtol, plus ``_WIDTH_WEIGHT`` × the expected
    log2 of its width over the converged width, so that where no placement can end the search
    this round the runs still split the likely part."""
    done = -math.log(1 - rtol)  # log width of a bracket with relative width rtol
    widths = np.diff(np.log(edges))
    open_ = widths > done * (1 + 1e-9)
    bisections = np.log2(np.maximum(widths, done) / done)
    return float(np.dot(np.diff(cdf(edges)), open_ + _WIDTH_WEIGHT * bisections))


def _spread_over_bracket(
    eps: float, points: Points, pending: Sequence[float], s: _Settings
) -> float:
    """``eps`` (the one-worker proposal), or a better run when others are pending in the bracket.

    Believing pending runs land on the estimate makes the next runs hedge a few per cent from
    it; instead the new run is placed, together with the pending ones, to split the bracket
    so that the part holding ε* is likely within rtol (:func:`_expected_cost`, with ε*
    believed near the estimate by :func:`_belief_cdf`). Candidates: ``eps``, a log-spaced grid
    over the bracket, the estimate, and the closing runs next to each bracket end and pending
    run.
    """
    lo, hi = _observed(points, s).bracket(s.threshold)
    if lo is None or hi is None:
        return eps
    inside = [p for p in pending if lo < p < hi]
    if not inside:
        return eps
    estimate = _model(points, s).crossing(s.threshold)
    cdf = _belief_cdf(lo, hi, estimate, s.rtol)
    close = 1 - _CLOSE * s.rtol
    marks = [lo, hi, *inside]
    candidates = [
        eps,
        *np.geomspace(lo, hi, _GRID + 2)[1:-1],
        *([estimate[0]] if estimate is not None else []),
        *(m / close for m in marks),
        *(m * close for m in marks),
    ]
    held = [e for e, _ in points] + list(pending)
    tol = _DUPLICATE * s.rtol
    best, best_cost = eps, math.inf
    for c in candidates:
        if not lo < c < hi or any(abs(c - h) <= tol * max(c, h) for h in held):
            continue
        cost = _expected_cost(np.sort([lo, hi, *inside, c]), cdf, s.rtol)
        if cost < best_cost - 1e-12:  # ties keep the earlier candidate: eps first
            best, best_cost = c, cost
    return float(best)


def _plan(points: Points, pending: Sequence[float], s: _Settings) -> float:
    """The ε for a new trial, given completed (ε, loss) results and the ε of pending trials."""
    if pending and not points:
        eps = _first_round(pending, s)
    else:
        believed = _believe(points, pending, s, flip_last=False)
        if pending and _search_over(believed, s, n_complete=0) is not None:
            believed = _believe(points, pending, s, flip_last=True)
        eps = _next_eps(believed, s, stalled=_stalled(points, s))
        eps = _spread_over_bracket(eps, points, pending, s)
    lo, hi = _observed(points, s).bracket(s.threshold)
    within = (lo or s.eps_low, hi or s.eps_high)
    return _avoid_duplicates(eps, [e for e, _ in points] + list(pending), within, s)


# --------------------------------------------------------------------------- reading a study
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
    """Completed (ε, loss) results and the ε of pending (RUNNING/WAITING) trials, by number.

    Failed and pruned trials, and completed ones with a non-finite loss, are ignored. ``skip``
    leaves out the trial being planned; ``finished`` = (number, loss) counts a trial that is
    finishing right now as completed (Optuna stores its state only after ``after_trial``).
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


def _request_stop(study: Study) -> None:
    """Ask ``study.optimize`` to return once the running trials are done."""
    try:
        study.stop()
    except RuntimeError:
        # Optuna allows stop() only inside optimize(); ask-and-tell drivers poll stop_reason().
        pass


# --------------------------------------------------------------------------- the sampler
class BisectionSampler(BaseSampler):
    """Proposes the ε of each adversarial training run so that ε* is found in few runs.

    The objective suggests ``param_name`` with ``trial.suggest_float(param_name, eps_low,
    eps_high)`` (``log=True`` or not) and returns the run's adversarial training loss
    R̂(θ̂(ε), ε); a NaN return makes the trial FAILED, and failed trials are ignored. The search
    and its stopping rules are described in the module docstring. When the search is over the
    sampler calls ``study.stop()``, and a trial started after that is pruned at its
    ``suggest_float`` call, before any training; ask-and-tell drivers check
    :meth:`stop_reason` before asking. Other parameters the objective suggests are drawn by a
    seeded random sampler.

    Args:
        threshold: R*(0), the clean model's clean test loss; ε* is where the loss crosses it.
        eps_low: smallest ε the search may run, in the objective's ε units (pixel units by
            convention, e.g. 0.1/255); > 0 because the search works in log ε.
        eps_high: largest ε the search may run, same units.
        rtol: stop once the bracket (largest ε at or below the threshold, smallest ε above it)
            has relative width (upper - lower) / upper <= rtol.
        clean_train_loss: the clean run's training loss, the known point (0, ·), used from the
            first proposal on (and by :func:`estimate_from_study` once recorded). Above the
            threshold, the search is over before any run: ε* is below the range.
        lower_guess: an ε believed to be <= ε* (e.g. where the clean model's attacked training
            loss reaches the threshold); no run goes below it unless a run contradicts it.
        initial_guess: where to run first (e.g. the fine-tuning extrapolation of SPEC §5).
            Default: ``lower_guess`` × 4, else the geometric middle of the range.
        max_trials: stop after this many completed runs.
        param_name: the name of the ε parameter.
        seed: seed of the random sampler for parameters other than ``param_name``; the ε
            proposals themselves are deterministic.

    Raises:
        ConfigError: on a non-finite threshold or clean_train_loss, eps_low <= 0,
            eps_low >= eps_high, rtol outside (0, 1), a guess outside the range, or
            max_trials < 1.

    Example:
        >>> import optuna
        >>> optuna.logging.set_verbosity(optuna.logging.WARNING)
        >>> sampler = BisectionSampler(
        ...     threshold=0.441, eps_low=0.1 / 255, eps_high=64 / 255, clean_train_loss=0.0403
        ... )
        >>> study = optuna.create_study(direction="minimize", sampler=sampler)
        >>> sampler.check_study(study)  # records threshold etc. as study user attrs
        >>> def objective(trial):  # stands in for one adversarial training run
        ...     eps = trial.suggest_float("eps", 0.1 / 255, 64 / 255, log=True)
        ...     return 0.0403 + 0.1205 * eps * 255
        >>> study.optimize(objective, n_trials=20)
        >>> sampler.stop_reason(study), len(study.trials)
        ('converged', 4)
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
            threshold,
            eps_low,
            eps_high,
            rtol,
            clean_train_loss,
            lower_guess,
            initial_guess,
            max_trials,
        )
        if not isinstance(param_name, str) or not param_name:
            raise ConfigError(f"param_name must be a non-empty string, got {param_name!r}")
        self.param_name = param_name
        self._others = optuna.samplers.RandomSampler(seed=seed)

    # ---------------------------------------------------------------- public helpers
    def describe(self) -> dict[str, Any]:
        """The settings, JSON-ready: what :meth:`check_study` stores as study user attrs."""
        return {
            **asdict(self._settings),
            "param_name": self.param_name,
            "sampler": type(self).__name__,
        }

    def check_study(self, study: Study) -> None:
        """Refuse a study searched with another threshold, ε name or clean loss; record ours.

        Call once after ``optuna.create_study(..., load_if_exists=True)``.

        Raises:
            ConfigError: when the study's stored settings differ (see :func:`ensure_compatible`).
        """
        settings = self.describe()
        ensure_compatible(study, **{k: settings[k] for k in _IDENTITY_KEYS})
        for key, value in settings.items():
            if key not in study.user_attrs or not _same(study.user_attrs[key], value):
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
        # worker asking next plans around it (GridSampler stores its grid_id the same way).
        if len(study.directions) != 1:
            raise ConfigError("BisectionSampler needs a single-objective study")
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
            raise ConfigError(f"suggest {param_name!r} with suggest_float and no step")
        trials = self._wait_for_earlier(study, trial.number)
        eps = trial.system_attrs.get(EPS_ATTR)
        if eps is None or self._taken(trials, trial.number, float(eps)):
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

    def _wait_for_earlier(self, study: Study, number: int) -> list[FrozenTrial]:
        """The study's trials once every earlier-numbered RUNNING trial holds its ε (or after
        ``_WAIT_S`` seconds, e.g. when an earlier worker died before storing it).

        Two trials started at the same instant may both plan before either stored its ε; the
        later one then has to see the earlier one's ε before it checks for a duplicate. Trials
        wait only on earlier ones, so no two wait on each other. WAITING trials are not waited
        on: one enqueued without an ε gets it only when it starts, which may be after us.
        """
        deadline = time.monotonic() + _WAIT_S
        while True:
            trials = study.get_trials(deepcopy=False)
            unknown = [
                t
                for t in trials
                if t.number < number
                and t.state == TrialState.RUNNING
                and _held_eps(t, self.param_name) is None
            ]
            if not unknown or time.monotonic() >= deadline:
                return trials
            time.sleep(_POLL_S)

    def _taken(self, trials: Sequence[FrozenTrial], number: int, eps: float) -> bool:
        """True when another live trial holds (about) the same ε and has the right to it: it
        started earlier, or it already runs (its parameter is set). Two workers that planned at
        the same instant without seeing each other get the same ε; the other one plans again."""
        tol = _DUPLICATE * self._settings.rtol
        live = (TrialState.RUNNING, TrialState.WAITING, TrialState.COMPLETE)
        for t in trials:
            held = _held_eps(t, self.param_name)
            if t.number == number or t.state not in live or held is None:
                continue
            if abs(held - eps) <= tol * max(held, eps):
                if t.number < number or self.param_name in t.params:
                    return True
        return False


def _store_eps(study: Study, trial: FrozenTrial, eps: float) -> None:
    # Optuna has no public setter for a FrozenTrial's system attrs; its own GridSampler uses
    # this storage call in before_trial.
    study._storage.set_trial_system_attr(trial._trial_id, EPS_ATTR, eps)


# --------------------------------------------------------------------------- study records
def study_settings(study: Study) -> dict[str, Any]:
    """The sampler settings recorded in a study's user attributes (empty for a fresh study)."""
    keys = {f.name for f in fields(_Settings)} | {"param_name", "sampler"}
    return {k: v for k, v in study.user_attrs.items() if k in keys}


def _same(a: Any, b: Any) -> bool:
    numbers = (int, float)
    if isinstance(a, numbers) and isinstance(b, numbers) and not isinstance(a, bool):
        return math.isclose(float(a), float(b), rel_tol=1e-9, abs_tol=0.0)
    return a == b


def ensure_compatible(study: Study, threshold: float, **extra: Any) -> None:
    """Raise ConfigError unless the study was searched with this threshold (and ``extra``).

    Only keys the study's user attributes already hold with a non-null value are compared, so
    a fresh study is always compatible. Numbers compare with a relative tolerance of 1e-9.

    Example:
        >>> import optuna
        >>> study = optuna.create_study(study_name="cifar10-10k")
        >>> study.set_user_attr("threshold", 0.441)
        >>> ensure_compatible(study, 0.441, norm="linf")  # norm not recorded: not compared
        >>> ensure_compatible(study, 0.5)
        Traceback (most recent call last):
        ...
        epsstar.config.ConfigError: study 'cifar10-10k' was searched with threshold=0.441, \
not 0.5; use a new study name
    """
    stored = study.user_attrs
    for key, value in {"threshold": threshold, **extra}.items():
        if stored.get(key) is not None and not _same(stored[key], value):
            raise ConfigError(
                f"study {study.study_name!r} was searched with {key}={stored[key]!r}, "
                f"not {value!r}; use a new study name"
            )


def estimate_from_study(
    study: Study, threshold: float | None = None, *, clean_train_loss: float | None = None
) -> Estimate:
    """ε* from a study's completed trials (SPEC §3: first bracketing pair, isotonic if needed).

    Args:
        study: a study searched with :class:`BisectionSampler`, or any study whose trials hold
            the ε parameter (the ``param_name`` user attribute, default ``"eps"``) and the
            adversarial training loss as their value.
        threshold: R*(0); default: the study's ``threshold`` user attribute.
        clean_train_loss: the clean point (0, ·); default: the study's ``clean_train_loss``
            user attribute, when recorded.

    Returns:
        The :class:`~epsstar.estimate.Estimate` in the trials' ε units. ``lower``/``upper`` is
        the bracket; ``bound`` is ``"above"`` (ε* > the largest tried ε) or ``"below"``
        (ε* < the smallest) when the crossing lies outside the tried range. Failed trials and
        non-finite losses are ignored; runs repeated at one ε are averaged. Before any run
        completes, the clean point alone gives a bound (ε* > 0, or ε* < 0 when the clean
        training loss is already above the threshold).

    Raises:
        ConfigError: without a threshold, or with neither a completed trial nor a clean point.
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
    points, _ = _read_trials(study.get_trials(deepcopy=False), attrs.get("param_name", "eps"))
    if not points and clean_train_loss is not None:  # no run yet: the clean point alone
        return interpolate_epsstar([0.0], [clean_train_loss], threshold)
    if not points:
        raise ConfigError(f"study {study.study_name!r} has no completed trial to estimate from")
    eps, losses = zip(*points, strict=True)
    return interpolate_epsstar(eps, losses, threshold, clean_train_loss=clean_train_loss)
