"""ε* estimators (SPEC §3 and §5). Pure computation: numpy/scipy only, no torch, no MLflow.

Units are the caller's: every function is scale-free in ε (pixel units in, pixel units out;
/255 in, /255 out).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal

import numpy as np

from epsstar.config import ConfigError

try:  # scipy >= 1.12
    from scipy.optimize import isotonic_regression as _scipy_isotonic
except ImportError:  # pragma: no cover - older scipy: fall back to scikit-learn in _isotonic
    _scipy_isotonic = None

Bound = Literal["above", "below"] | None


@dataclass(frozen=True)
class Estimate:
    """An ε* estimate.

    ``bound`` is ``None`` for a proper crossing; ``"above"`` means ε* > ``lower`` (every tried ε
    stayed at or below the threshold, ``epsstar`` is then the largest tried ε and ``upper`` is
    ``inf``); ``"below"`` means ε* < ``upper`` (even the smallest tried ε was above, ``lower``
    is 0).
    """

    epsstar: float  # the point estimate (a bound's value when ``bound`` is set)
    lower: float  # bracket: the largest ε known to be at or below the threshold
    upper: float  # bracket: the smallest ε known to be above the threshold
    bound: Bound  # None | "above" | "below"
    method: str  # "interpolation" | "extrapolation" | "extrapolation-1pt" | "bisection"
    threshold: float  # R*(0), the clean model's clean test loss
    isotonic: bool = False  # True when a non-monotone curve was made monotone first

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ---------------------------------------------------------------------------------------------
# validation shared by every estimator


def _points(eps: Sequence[float], losses: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """Check and convert (ε, loss) pairs: equal lengths, non-empty, finite, ε ≥ 0."""
    x = np.asarray(eps, dtype=float).ravel()
    y = np.asarray(losses, dtype=float).ravel()
    if x.size != y.size:
        raise ConfigError(f"got {x.size} eps values but {y.size} losses")
    if x.size == 0:
        raise ConfigError("no (eps, loss) points to estimate eps* from")
    if not (np.isfinite(x).all() and np.isfinite(y).all()):
        raise ConfigError("eps and losses must be finite numbers (found NaN or inf)")
    if (x < 0).any():
        raise ConfigError(f"eps must be >= 0, got {x.min():g}")
    return x, y


def _finite(name: str, value: float) -> float:
    value = float(value)
    if not math.isfinite(value):
        raise ConfigError(f"{name} must be a finite number, got {value}")
    return value


def _with_clean_point(
    x: np.ndarray, y: np.ndarray, clean_train_loss: float | None
) -> tuple[np.ndarray, np.ndarray]:
    if clean_train_loss is None:
        return x, y
    clean = _finite("clean_train_loss", clean_train_loss)
    return np.append(x, 0.0), np.append(y, clean)


# ---------------------------------------------------------------------------------------------
# SPEC §3: piecewise-linear interpolation of from-scratch runs


def _isotonic(y: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Weighted non-decreasing least-squares fit (pool adjacent violators)."""
    if _scipy_isotonic is not None:
        return _scipy_isotonic(y, weights=weights, increasing=True).x
    from sklearn.isotonic import isotonic_regression  # scipy < 1.12 has no isotonic fit

    return isotonic_regression(y, sample_weight=weights, increasing=True)


def _crossing(x: np.ndarray, y: np.ndarray, threshold: float, isotonic: bool) -> Estimate:
    """Cross ``threshold`` on a non-decreasing curve sampled at sorted, distinct ``x``."""
    x, y = x.tolist(), y.tolist()  # plain floats in the Estimate, not numpy scalars
    above = [i for i, loss in enumerate(y) if loss > threshold]
    if not above:  # every tried ε at or below R*(0): ε* > max ε
        return Estimate(x[-1], x[-1], math.inf, "above", "interpolation", threshold, isotonic)
    i = above[0]
    if i == 0:  # even the smallest tried ε is above R*(0): ε* < min ε
        return Estimate(x[0], 0.0, x[0], "below", "interpolation", threshold, isotonic)
    # first bracketing pair: y[i-1] <= threshold < y[i], so the denominator is > 0
    frac = (threshold - y[i - 1]) / (y[i] - y[i - 1])
    value = x[i - 1] + frac * (x[i] - x[i - 1])
    return Estimate(value, x[i - 1], x[i], None, "interpolation", threshold, isotonic)


def _interpolate_means(
    x: np.ndarray, y: np.ndarray, counts: np.ndarray, threshold: float
) -> Estimate:
    """Estimate from per-ε mean losses (sorted distinct ``x``), weighting the fit by run counts."""
    monotone = bool((np.diff(y) >= 0).all())
    curve = y if monotone else _isotonic(y, counts)
    return _crossing(x, curve, threshold, isotonic=not monotone)


def _group_means(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Average the runs (seeds) at each distinct ε: (sorted ε, mean loss, run count)."""
    xs, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
    return xs, np.bincount(inverse, weights=y) / counts, counts


def interpolate_epsstar(
    eps: Sequence[float],
    losses: Sequence[float],
    threshold: float,
    *,
    clean_train_loss: float | None = None,
) -> Estimate:
    """ε* from from-scratch runs by piecewise-linear interpolation (SPEC §3).

    Args:
        eps: attack strength of each run (any unit; the result is in the same unit).
        losses: R̂(θ̂(ε), ε) of each run, the adversarial training loss at the early-stopping epoch.
            Several runs at the same ε (seeds) are averaged.
        threshold: R*(0), the clean model's clean test loss.
        clean_train_loss: when given, the clean run's training loss, added as the point (0, ·).

    Returns:
        The ε where the curve first crosses ``threshold`` (first consecutive pair in ε order with
        loss ≤ threshold then > threshold); ``lower``/``upper`` are that pair's ε. A curve that is
        not non-decreasing is replaced by its isotonic fit first (``isotonic=True``). If no ε
        exceeds the threshold the result is the bound ε* > max ε; if the smallest already does,
        ε* < min ε (see :class:`Estimate`).

    Example:
        >>> interpolate_epsstar([0, 1, 2, 8], [0.0403, 0.1586, 0.2199, 1.2186], 0.441).epsstar
        3.328...
    """
    x, y = _points(eps, losses)
    threshold = _finite("threshold", threshold)
    x, y = _with_clean_point(x, y, clean_train_loss)
    return _interpolate_means(*_group_means(x, y), threshold)


def bootstrap_epsstar(
    eps: Sequence[float],
    losses: Sequence[float],
    threshold: float,
    *,
    clean_train_loss: float | None = None,
    n_boot: int = 1000,
    seed: int = 0,
    level: float = 0.9,
) -> tuple[float, float]:
    """Percentile bootstrap interval for :func:`interpolate_epsstar` when seeds repeat.

    Each replicate resamples, with replacement, the runs within every ε (keeping each ε's run
    count; the clean point ``clean_train_loss`` is held fixed), then re-runs the interpolation.
    Bound results enter as their bound value (the largest or smallest tried ε).

    Returns:
        ``(lower, upper)``: the ``(1 - level)/2`` and ``(1 + level)/2`` quantiles, in ε units.

    Raises:
        ConfigError: when no ε has at least two runs (there is nothing to resample), or on
            ``n_boot < 1`` or ``level`` outside (0, 1).
    """
    x, y = _points(eps, losses)
    threshold = _finite("threshold", threshold)
    if n_boot < 1 or not 0.0 < level < 1.0:
        raise ConfigError(f"need n_boot >= 1 and 0 < level < 1, got {n_boot} and {level}")
    xs, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
    if counts.max() < 2:
        raise ConfigError("bootstrap needs at least one eps with two or more runs (seeds)")
    rng = np.random.default_rng(seed)
    # (n_boot, n_eps): mean of a resample of each ε's runs, one row per replicate
    means = np.column_stack(
        [rng.choice(y[inverse == j], size=(n_boot, c)).mean(axis=1) for j, c in enumerate(counts)]
    )
    if clean_train_loss is not None:
        xs, means, counts = _add_fixed_clean(xs, means, counts, clean_train_loss)
    values = [_interpolate_means(xs, row, counts, threshold).epsstar for row in means]
    lo, hi = np.quantile(values, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


def _add_fixed_clean(
    xs: np.ndarray, means: np.ndarray, counts: np.ndarray, clean_train_loss: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Merge the fixed clean point (0, clean_train_loss) into every replicate's per-ε means."""
    clean = _finite("clean_train_loss", clean_train_loss)
    if xs[0] == 0:  # runs at ε = 0 exist: the clean point is one more run there
        means = means.copy()
        means[:, 0] = (means[:, 0] * counts[0] + clean) / (counts[0] + 1)
        return xs, means, counts + (np.arange(counts.size) == 0)
    column = np.full((means.shape[0], 1), clean)
    return np.append(0.0, xs), np.hstack([column, means]), np.append(1, counts)


# ---------------------------------------------------------------------------------------------
# SPEC §5: extrapolation from adversarial fine-tuning (Algorithm A.1)


@dataclass(frozen=True)
class _Line:
    """Ordinary least-squares line y = intercept + slope·x with what the Fieller interval needs."""

    intercept: float
    slope: float
    n: int  # number of points
    x_mean: float
    sxx: float  # Σ (x - x̄)²
    resid_var: float  # s² = RSS / (n - 2); 0 when n = 2 (the line passes through both points)

    @classmethod
    def fit(cls, x: np.ndarray, y: np.ndarray) -> _Line:
        x_mean, y_mean = x.mean(), y.mean()
        sxx = float(((x - x_mean) ** 2).sum())
        slope = float(((x - x_mean) * (y - y_mean)).sum() / sxx)
        intercept = float(y_mean - slope * x_mean)
        rss = float(((y - intercept - slope * x) ** 2).sum())
        resid_var = rss / (x.size - 2) if x.size > 2 else 0.0
        return cls(intercept, slope, x.size, float(x_mean), sxx, resid_var)

    def fieller(self, y0: float, level: float) -> tuple[float, float]:
        """Confidence interval for the x where the fitted mean line equals ``y0``.

        Inverse prediction: the set of x whose line value is not significantly different from
        ``y0``, (y0 - a - b·x)² ≤ t²·s²·(1/n + (x - x̄)²/Sxx), t the two-sided ``level`` quantile
        with n - 2 degrees of freedom. When the slope is not significantly positive the set is
        unbounded and the interval is (0, inf).
        """
        from scipy.stats import t as student_t

        if self.resid_var == 0.0:  # exact fit (or one fine-tuned point): no spread to report
            root = (y0 - self.intercept) / self.slope
            return root, root
        q = student_t.ppf((1 + level) / 2, self.n - 2) ** 2 * self.resid_var
        a = self.slope**2 - q / self.sxx
        if a <= 0:
            return 0.0, math.inf
        d = y0 - (self.intercept + self.slope * self.x_mean)  # y0 - ȳ
        half = math.sqrt(q * (d**2 / self.sxx + a / self.n))
        lo, hi = ((self.slope * d - half) / a, (self.slope * d + half) / a)
        return max(0.0, float(self.x_mean + lo)), float(self.x_mean + hi)


def extrapolate_epsstar(
    eps: Sequence[float],
    losses: Sequence[float],
    clean_train_loss: float,
    threshold: float,
    *,
    level: float = 0.9,
) -> Estimate:
    """ε* from adversarially fine-tuned checkpoints by linear extrapolation (SPEC §5, Alg. A.1).

    Fits y = a + b·ε by ordinary least squares through the clean point (0, ``clean_train_loss``)
    and the fine-tuned points (intercept free, all points weighted equally) and solves
    a + b·ε = ``threshold``. With one fine-tuned ε this is the line through the two points
    (method ``"extrapolation-1pt"``), otherwise ``"extrapolation"``.

    Args:
        eps: attack strength of each fine-tuned run, > 0 (any unit; the result is in the same unit).
        losses: each fine-tuned model's adversarial training loss at its best epoch.
        clean_train_loss: the clean model's training loss (the point at ε = 0).
        threshold: R*(0), the clean model's clean test loss.
        level: confidence level of the ``lower``/``upper`` interval.

    Returns:
        ``lower``/``upper`` are not a bracket here but a Fieller (inverse-prediction) confidence
        interval for the crossing of the fitted line, from the residual spread of the fit; with
        two points there is no spread and ``lower = upper = epsstar``. If the line is already
        above the threshold at ε = 0 the result is the bound ε* < min ε (``"below"``); if it
        never rises (slope ≤ 0) the bound ε* > max ε (``"above"``).

    Example:
        >>> extrapolate_epsstar([0.5], [0.0829], 0.0403, 0.441).epsstar
        4.703...
    """
    x, y = _points(eps, losses)
    if (x <= 0).any():
        raise ConfigError("fine-tuned eps must be > 0 (the clean point is clean_train_loss)")
    threshold = _finite("threshold", threshold)
    clean = _finite("clean_train_loss", clean_train_loss)
    method = "extrapolation-1pt" if np.unique(x).size == 1 else "extrapolation"
    line = _Line.fit(np.append(0.0, x), np.append(clean, y))
    lo_eps, hi_eps = float(x.min()), float(x.max())
    if line.intercept > threshold:  # the line is above R*(0) for every ε ≥ 0
        return Estimate(lo_eps, 0.0, lo_eps, "below", method, threshold)
    if line.slope <= 0:  # the line never rises to R*(0)
        return Estimate(hi_eps, hi_eps, math.inf, "above", method, threshold)
    value = (threshold - line.intercept) / line.slope
    lower, upper = line.fieller(threshold, level)
    return Estimate(value, lower, upper, None, method, threshold)
