"""Linear regression: the phase transition of the paper's Section 4 (SPEC §6). numpy/scipy only.

Data: ``y = θ₀ᵀx + σ·noise`` with ``x ~ N(0, I_d)``, ``noise ~ N(0, 1)`` and ``θ₀ = (1, …, 1)/√d``
(unit norm, signal spread over every coordinate). ε is in the units of ``x`` (one unit = one
standard deviation of a feature).

Adversarial training minimises the exact inner maximum of the squared loss,

    R̂(θ, ε) = (1/n) Σᵢ max_{‖zᵢ‖ ≤ ε} (yᵢ − θᵀ(xᵢ + zᵢ))² = (1/n) Σᵢ (|rᵢ| + ε‖θ‖_*)²,

with residual ``rᵢ = yᵢ − θᵀxᵢ`` and ``‖·‖_*`` the dual of the attack norm (L2 → ‖θ‖₂,
L∞ → ‖θ‖₁). Everything is vectorised over E attack strengths × R repetitions (independent data
sets), so a whole ε grid with hundreds of repetitions is a few hundred batched matrix products.

**The descent.** Full-batch gradient descent from θ = 0 with a step size that depends only on
the data shape (:func:`default_lr`), the same for every ε so that trajectories are comparable
step by step. The norm terms ``2ε·m·‖θ‖_* + ε²‖θ‖_*²`` (m = mean |r| at the current iterate) are
taken as a proximal (backward) step, the data term ``−(2/n) Σ sign(rᵢ)(|rᵢ| + ε‖θ‖_*) xᵢ`` as an
explicit gradient step. At ε = 0 this *is* plain gradient descent on the clean loss; for small ε it
differs from the explicit subgradient step only at second order in the step size. Why not the
explicit step: its curvature ε² (L2; up to d·ε² for L∞) and the kink of ‖θ‖ at 0 make a fixed step
diverge or oscillate around 0 once ε ≳ 1, which the grid up to 100·√(d/n) reaches; the proximal
step is stable for every ε, its fixed points are exactly the adversarial minimisers, and θ stays
at 0 once 0 is one (the subgradient of the norm at 0 is never needed). The data term keeps the kinks
of |rᵢ| (through ε‖θ‖_*·mean|r| it behaves like least absolute deviations), so, like any
subgradient method with a fixed step, the iterates end up hovering within O(step size) of the
minimiser rather than on it.

**Early stopping (SPEC §2).** θ̂(ε) is the iterate, over steps 0…T, with the smallest adversarial
*test* loss, here computed exactly (an infinite test set; the paper stopped on its test set):
for Gaussian x, ``r ~ N(0, s²)`` with ``s² = ‖θ − θ₀‖² + σ²``, so
``E(|r| + a)² = s² + 2a·s·√(2/π) + a²`` with ``a = ε‖θ‖_*`` (:func:`adv_test_loss`); at ε = 0 this
is the clean test loss ``‖θ − θ₀‖² + σ²`` (:func:`clean_test_loss`), whose value at θ̂(0) is the
threshold R*(0). T only has to be long enough for the clean run to pass its best step.

**Distinguishing adversarial from clean runs.** On each of R data sets one clean run and one
adversarial run per ε are made. The adversarial run on data set r is tested against the clean
runs on the *other* R − 1 data sets (leave-one-out: the reference sample is independent of the
tested run, and every tested run is compared with the same population, so the median below has
no common offset from one reference sample's chance error):

- θ: Hotelling's T² for one new observation, ``T² = m/(m+1)·(θ − θ̄)ᵀS⁻¹(θ − θ̄)`` with the
  reference mean θ̄ and covariance S of the m = R − 1 clean runs;
  ``(m−d)/(d(m−1))·T² ~ F(d, m−d)`` exactly under a Gaussian clean distribution. Chosen over
  per-coordinate tests with Bonferroni/Holm because the adversarial shift is a shrinkage along θ
  (spread over all coordinates, correlated with the estimation error), which a test of the whole
  vector in the clean runs' own metric detects at its natural scale, without a correction that
  grows with d. Needs m > d. Both tails
  of F count (p = 2·min(cdf, sf)): for d < n the shrinkage moves θ̂ far from θ̄ (large T²), but
  for d > n the clean estimates are dominated by noise in every direction and a shrunk θ̂ sits
  *too close* to θ̄ (T² far below its null value d), which is just as impossible for a clean run.
- training loss: the adversarial training loss R̂(θ̂_r(ε), ε) against the clean training losses
  R̂(θ̂_j(0), 0), j ≠ r, by the one-sided prediction t-test
  ``t = (x − mean)/(sd·√(1 + 1/m)) ~ t_{m−1}`` (normal approximation of the clean losses, whose
  mean and sd are estimated); "larger than clean" is the only alternative (R̂(θ, ε) ≥ R̂(θ, 0)).

Both give one p-value per adversarial run, uniform on [0, 1] at ε = 0; the curves report their
median over repetitions (the p-value of a typical run).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats

from epsstar.config import ConfigError

_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)  # E|N(0, 1)|


# ---------------------------------------------------------------------------------------------
# dual norms of the attack norms, and their proximal operators


@dataclass(frozen=True)
class DualNorm:
    """The dual norm ‖θ‖_* of an attack norm and the prox of ``a‖θ‖_* + b‖θ‖_*²``."""

    value: Callable[[np.ndarray], np.ndarray]  # (..., d) -> (...)
    prox: Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]  # (v, a, b) -> (..., d)


def _prox_l2(v: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """argmin_θ ½‖θ − v‖² + a‖θ‖₂ + b‖θ‖₂²: shrink the radius to (‖v‖ − a)₊/(1 + 2b)."""
    radius = np.linalg.norm(v, axis=-1)
    scale = np.maximum(radius - a, 0.0) / ((1.0 + 2.0 * b) * np.maximum(radius, 1e-300))
    return v * scale[..., None]


def _prox_l1(v: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """argmin_θ ½‖θ − v‖² + a‖θ‖₁ + b‖θ‖₁²: soft-thresholding at λ = a + 2b‖θ‖₁.

    With the k largest |vⱼ| active, ‖θ‖₁ = (c_k − k·a)/(1 + 2bk) (c_k their sum), so
    λ_k = (a + 2b·c_k)/(1 + 2bk); the active set is the prefix where |v|_(k) > λ_k (a prefix
    because |v|_(k)(1 + 2bk) − 2b·c_k decreases in k).
    """
    u = -np.sort(-np.abs(v), axis=-1)  # (..., d), descending
    k = np.arange(1, v.shape[-1] + 1)
    c = np.cumsum(u, axis=-1)
    a, b = a[..., None], np.asarray(b)[..., None]
    active = (u * (1.0 + 2.0 * b * k) > a + 2.0 * b * c).sum(axis=-1, keepdims=True)
    c_active = np.take_along_axis(np.concatenate([np.zeros_like(c[..., :1]), c], -1), active, -1)
    lam = (a + 2.0 * b * c_active) / (1.0 + 2.0 * b * active)
    return np.sign(v) * np.maximum(np.abs(v) - lam, 0.0)


# attack norm -> dual norm of θ (the inner maximum is (|r| + ε‖θ‖_*)²)
DUAL_NORMS: dict[str, DualNorm] = {
    "l2": DualNorm(value=lambda t: np.linalg.norm(t, axis=-1), prox=_prox_l2),
    "linf": DualNorm(value=lambda t: np.abs(t).sum(axis=-1), prox=_prox_l1),
}


def dual_norm(norm: str) -> DualNorm:
    if norm not in DUAL_NORMS:
        raise ConfigError(f"unknown norm {norm!r}; choose one of: {', '.join(DUAL_NORMS)}")
    return DUAL_NORMS[norm]


# ---------------------------------------------------------------------------------------------
# data


@dataclass(frozen=True)
class Problem:
    """R independent regression data sets of the same shape."""

    x: np.ndarray  # (R, n, d) features, N(0, I_d)
    y: np.ndarray  # (R, n) responses
    theta0: np.ndarray  # (d,) true parameter, unit L2 norm
    sigma: float  # noise standard deviation

    @property
    def reps(self) -> int:
        return self.x.shape[0]


def sample_problem(
    d: int, n: int, reps: int, sigma: float, rng: np.random.Generator
) -> Problem:
    """Draw ``reps`` data sets of n samples in d dimensions (see the module docstring)."""
    if min(d, n, reps) < 1:
        raise ConfigError(f"d, n and reps must be >= 1, got d={d}, n={n}, reps={reps}")
    if not math.isfinite(sigma) or sigma < 0:
        raise ConfigError(f"sigma must be a finite number >= 0, got {sigma}")
    theta0 = np.full(d, 1.0 / math.sqrt(d))
    x = rng.standard_normal((reps, n, d))
    y = x @ theta0 + sigma * rng.standard_normal((reps, n))
    return Problem(x=x, y=y, theta0=theta0, sigma=float(sigma))


def default_lr(d: int, n: int) -> float:
    """A tenth of the largest stable step for the clean loss (1/n)‖y − Xθ‖² with Gaussian X.

    Its Hessian 2XᵀX/n has top eigenvalue ≈ 2(1 + √(d/n))² (Marchenko–Pastur edge), so gradient
    descent is stable below 1/(1 + √(d/n))². A tenth of that follows the gradient flow of the
    theory closely (the clean run's best step is some 10–50 steps in, so the trajectory is
    resolved) and still converges within 100 steps for d < n.
    """
    return 0.1 / (1.0 + math.sqrt(d / n)) ** 2


# ---------------------------------------------------------------------------------------------
# losses


def clean_test_loss(theta: np.ndarray, theta0: np.ndarray, sigma: float) -> np.ndarray:
    """Exact clean test loss E(y − θᵀx)² = ‖θ − θ₀‖² + σ²; θ: (..., d) -> (...)."""
    return np.sum((theta - theta0) ** 2, axis=-1) + sigma**2


def adv_test_loss(
    theta: np.ndarray, theta0: np.ndarray, sigma: float, eps: np.ndarray | float, norm: str
) -> np.ndarray:
    """Exact adversarial test loss E(|y − θᵀx| + ε‖θ‖_*)²; θ: (..., d), ε broadcast to (...)."""
    s = np.sqrt(clean_test_loss(theta, theta0, sigma))
    a = np.asarray(eps) * dual_norm(norm).value(theta)
    return s**2 + 2.0 * _SQRT_2_OVER_PI * a * s + a**2


def empirical_adv_loss(
    problem: Problem, theta: np.ndarray, eps: np.ndarray | float, norm: str
) -> np.ndarray:
    """R̂(θ, ε) = (1/n) Σ (|rᵢ| + ε‖θ‖_*)² on each data set; θ: (..., R, d) -> (..., R)."""
    r = problem.y - (problem.x @ theta[..., None])[..., 0]
    a = np.asarray(eps) * dual_norm(norm).value(theta)
    return np.mean((np.abs(r) + a[..., None]) ** 2, axis=-1)


# ---------------------------------------------------------------------------------------------
# gradient descent


def trajectory(
    problem: Problem, eps: Sequence[float] | np.ndarray, norm: str, *, lr: float, steps: int
) -> Iterator[np.ndarray]:
    """Yield θ⁽ᵗ⁾ for t = 0 … steps, each of shape (E, R, d), for every ε and repetition.

    All E runs of a repetition see the same data (paired). See the module docstring for the
    step (explicit on the data term, proximal on the norm terms; plain GD at ε = 0).
    """
    dual = dual_norm(norm)
    eps = np.asarray(eps, dtype=float)  # (E,)
    n = problem.x.shape[1]
    # computed as (R, E, d): one (E, d) @ (d, n) product per repetition is far faster than
    # E·R matrix-vector products
    theta = np.zeros((problem.reps, eps.size, problem.x.shape[2]))
    xt = np.swapaxes(problem.x, 1, 2)  # (R, d, n)
    y = problem.y[:, None, :]  # (R, 1, n)
    yield np.swapaxes(theta, 0, 1)
    for _ in range(steps):
        r = y - theta @ xt  # (R, E, n)
        abs_r = np.abs(r)
        pull = r + np.copysign((eps * dual.value(theta))[..., None], r)  # sign(r)(|r| + εN)
        v = theta + lr * (2.0 / n) * (pull @ problem.x)
        theta = dual.prox(v, 2.0 * lr * eps * abs_r.mean(axis=-1), lr * eps**2)
        yield np.swapaxes(theta, 0, 1)


@dataclass(frozen=True)
class Fit:
    """Early-stopped gradient-descent runs for E attack strengths × R repetitions."""

    eps: np.ndarray  # (E,) attack strengths, units of x
    theta: np.ndarray  # (E, R, d) θ̂(ε): the step with the smallest exact adversarial test loss
    stop: np.ndarray  # (E, R) that step (0 … steps)
    train_loss: np.ndarray  # (E, R) R̂(θ̂(ε), ε), adversarial training loss at θ̂(ε)
    test_loss: np.ndarray  # (E, R) exact adversarial test loss at θ̂(ε) (R*(0) at ε = 0)
    rel_diff: np.ndarray  # (steps+1, E, R) ‖θ⁽ᵗ⁾(ε) − θ⁽ᵗ⁾(ε₀)‖/‖θ⁽ᵗ⁾(ε₀)‖, NaN at t = 0


def fit(
    problem: Problem,
    eps: Sequence[float] | np.ndarray,
    norm: str,
    *,
    lr: float,
    steps: int,
) -> Fit:
    """Run :func:`trajectory` and keep, per run, the early-stopped iterate (SPEC §2).

    ``rel_diff`` compares every run with the run at ``eps[0]`` on the same data at the same step:
    pass ε = 0 first to measure the distance from clean training.
    """
    if steps < 1:
        raise ConfigError(f"steps must be >= 1, got {steps}")
    eps = np.asarray(eps, dtype=float)
    best_loss = np.full((eps.size, problem.reps), np.inf)
    best_theta = np.zeros((eps.size, problem.reps, problem.x.shape[2]))
    stop = np.zeros((eps.size, problem.reps), dtype=int)
    rel_diff = np.full((steps + 1, eps.size, problem.reps), np.nan)
    with np.errstate(invalid="ignore", divide="ignore"):  # 0/0 at t = 0 is the NaN we want
        for t, theta in enumerate(trajectory(problem, eps, norm, lr=lr, steps=steps)):
            loss = adv_test_loss(theta, problem.theta0, problem.sigma, eps[:, None], norm)
            better = loss < best_loss
            best_loss = np.where(better, loss, best_loss)
            best_theta = np.where(better[..., None], theta, best_theta)
            stop = np.where(better, t, stop)
            gap = np.linalg.norm(theta - theta[:1], axis=-1)
            rel_diff[t] = gap / np.linalg.norm(theta[:1], axis=-1)
    train = empirical_adv_loss(problem, best_theta, eps[:, None], norm)
    return Fit(eps, best_theta, stop, train, best_loss, rel_diff)


def adv_train_loss(eps: float, problem: Problem, norm: str, *, lr: float, steps: int) -> float:
    """R̂(θ̂(ε), ε) averaged over the repetitions: what one "adversarial training run" reports."""
    return float(fit(problem, [eps], norm, lr=lr, steps=steps).train_loss.mean())


# ---------------------------------------------------------------------------------------------
# is an adversarial run distinguishable from clean runs?


def hotelling_pvalues(clean: np.ndarray, runs: np.ndarray) -> np.ndarray:
    """P-value that ``runs[..., r, :]`` comes from the distribution of the clean runs j ≠ r.

    clean: (R, d) clean estimates θ̂_j(0), R > d + 1; runs: (..., R, d) -> (..., R).
    Hotelling's T² for one new observation against the leave-one-out mean and covariance
    (computed for all r at once by a rank-one downdate), exact F(d, m − d) null with m = R − 1,
    both tails (see the module docstring).
    """
    R, d = clean.shape
    m = R - 1
    if m <= d:
        raise ConfigError(f"Hotelling's T² needs reps > d + 1 (reps={R}, d={d})")
    w = clean - clean.mean(axis=0)  # (R, d)
    a_inv = np.linalg.inv(w.T @ w)  # inverse scatter matrix of all R runs
    a_inv_w = w @ a_inv  # (R, d)
    leverage = np.sum(a_inv_w * w, axis=-1)  # (R,)
    k = R / (R - 1)  # removing run r lowers the scatter matrix by k·w_r w_rᵀ
    diff = runs - clean.mean(axis=0) + w / (R - 1)  # run minus the leave-one-out mean
    quad = np.einsum("...i,ij,...j->...", diff, a_inv, diff)
    quad += k * np.sum(diff * a_inv_w, axis=-1) ** 2 / (1.0 - k * leverage)  # Sherman–Morrison
    t2 = m / (m + 1) * (m - 1) * quad  # (m - 1)·quad = Mahalanobis² with S = scatter/(m - 1)
    f = (m - d) / (d * (m - 1)) * t2
    return np.minimum(1.0, 2.0 * np.minimum(stats.f.cdf(f, d, m - d), stats.f.sf(f, d, m - d)))


def loss_pvalues(clean: np.ndarray, runs: np.ndarray) -> np.ndarray:
    """One-sided p-value that ``runs[..., r]`` is no larger than the clean losses j ≠ r.

    clean: (R,) clean training losses; runs: (..., R) -> (..., R). Prediction t-test against
    the leave-one-out mean and sd: ``(x − mean)/(sd·√(1 + 1/m)) ~ t_{m−1}``, m = R − 1, under
    normality of the clean losses.
    """
    R = clean.shape[0]
    m = R - 1
    if m < 2:
        raise ConfigError(f"the loss p-value needs reps >= 3, got {R}")
    mean = (clean.sum() - clean) / m
    var = (np.sum(clean**2) - clean**2 - m * mean**2) / (m - 1)
    return stats.t.sf((runs - mean) / np.sqrt(var * (1.0 + 1.0 / m)), m - 1)


# ---------------------------------------------------------------------------------------------
# the curves of one (d, n) setting


@dataclass(frozen=True)
class Curves:
    """Section 4's curves over an ε grid, summarised over R paired repetitions."""

    eps: np.ndarray  # (E,) the grid, units of x
    pvalue_theta: np.ndarray  # (E,) median p-value of θ̂(ε) against the clean θ̂(0) (Hotelling)
    pvalue_loss: np.ndarray  # (E,) median p-value of R̂(θ̂(ε), ε) against clean training losses
    traj_diff: np.ndarray  # (E,) mean relative trajectory difference at the clean run's stop
    step_diff: np.ndarray  # (steps+1, E) mean relative trajectory difference per step (NaN at 0)
    adv_train_loss: np.ndarray  # (E,) mean R̂(θ̂(ε), ε)
    threshold: float  # R*(0): mean clean test loss of the clean runs at θ̂(0)
    clean_train_loss: float  # mean R̂(θ̂(0), 0)
    clean_stop: float  # median early-stopping step of the clean runs


def phase_curves(
    problem: Problem, eps: Sequence[float] | np.ndarray, norm: str, *, lr: float, steps: int
) -> Curves:
    """On every data set a clean run and one adversarial run per ε; each adversarial run is
    compared with its own clean run (trajectory difference) and with the clean runs on the other
    data sets (p-values)."""
    runs = fit(problem, np.concatenate([[0.0], eps]), norm, lr=lr, steps=steps)
    clean, adv = 0, slice(1, None)  # index 0 is the clean run
    at_clean_stop = np.take_along_axis(runs.rel_diff, runs.stop[:1][None], axis=0)[0]
    return Curves(
        eps=np.asarray(eps, dtype=float),
        pvalue_theta=np.median(hotelling_pvalues(runs.theta[clean], runs.theta[adv]), axis=1),
        pvalue_loss=np.median(loss_pvalues(runs.train_loss[clean], runs.train_loss[adv]), axis=1),
        traj_diff=at_clean_stop[adv].mean(axis=1),
        step_diff=runs.rel_diff[:, adv].mean(axis=2),
        adv_train_loss=runs.train_loss[adv].mean(axis=1),
        threshold=float(runs.test_loss[clean].mean()),
        clean_train_loss=float(runs.train_loss[clean].mean()),
        clean_stop=float(np.median(runs.stop[clean])),
    )
