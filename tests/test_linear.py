"""Linear-regression phase transition (epsstar.linear): the algebra, the descent, the tests."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import optimize, stats

from epsstar import linear
from epsstar.config import ConfigError

NORMS = tuple(linear.DUAL_NORMS)


def _problem(d: int, n: int, reps: int, seed: int = 0, sigma: float = 1.0) -> linear.Problem:
    return linear.sample_problem(d, n, reps, sigma, np.random.default_rng(seed))


def _curves(d: int, n: int, reps: int, ratios, norm: str = "l2", seed: int = 0) -> linear.Curves:
    eps = math.sqrt(d / n) * np.asarray(ratios, dtype=float)
    return linear.phase_curves(_problem(d, n, reps, seed), eps, norm,
                               lr=linear.default_lr(d, n), steps=100)


# ------------------------------------------------------------------------- losses and proxes
@pytest.mark.parametrize("norm", NORMS)
def test_closed_form_is_the_inner_maximum(norm: str) -> None:
    """(|r| + ε‖θ‖_*)² is attained by the explicit worst z and beats random z in the ball."""
    rng = np.random.default_rng(1)
    problem = _problem(d=4, n=30, reps=1, seed=1)
    theta, eps = rng.standard_normal((1, 4)), 0.3
    x, y = problem.x[0], problem.y[0]
    r = y - x @ theta[0]
    direction = theta[0] / np.linalg.norm(theta[0]) if norm == "l2" else np.sign(theta[0])
    worst = x - np.sign(r)[:, None] * eps * direction  # moves every residual away from 0
    attained = np.mean((y - worst @ theta[0]) ** 2)
    closed = linear.empirical_adv_loss(problem, theta, eps, norm)[0]
    assert closed == pytest.approx(attained, rel=1e-12)
    z = rng.uniform(-1, 1, (200, 30, 4))
    ball = {"l2": lambda v: v / np.linalg.norm(v, axis=-1, keepdims=True),
            "linf": lambda v: np.sign(v)}[norm]
    random_losses = np.mean((y - (x + eps * ball(z)) @ theta[0]) ** 2, axis=-1)
    assert random_losses.max() <= closed


@pytest.mark.parametrize("norm", NORMS)
def test_adv_test_loss_matches_monte_carlo(norm: str) -> None:
    rng = np.random.default_rng(2)
    d, sigma, eps = 3, 0.7, 0.4
    theta0 = np.full(d, 1 / math.sqrt(d))
    theta = rng.standard_normal(d)
    x = rng.standard_normal((400_000, d))
    r = x @ theta0 + sigma * rng.standard_normal(400_000) - x @ theta
    mc = np.mean((np.abs(r) + eps * linear.DUAL_NORMS[norm].value(theta)) ** 2)
    exact = linear.adv_test_loss(theta, theta0, sigma, eps, norm)
    assert exact == pytest.approx(mc, rel=0.01)
    assert linear.adv_test_loss(theta, theta0, sigma, 0.0, norm) == pytest.approx(
        linear.clean_test_loss(theta, theta0, sigma))


@pytest.mark.parametrize("norm", NORMS)
def test_prox_solves_its_problem(norm: str) -> None:
    rng = np.random.default_rng(3)
    dual = linear.DUAL_NORMS[norm]
    for a, b in [(0.0, 0.0), (0.3, 0.0), (0.1, 0.5), (2.0, 0.2), (0.05, 3.0)]:
        v = rng.standard_normal(5)
        got = dual.prox(v, np.asarray(a), np.asarray(b))

        def objective(t, v=v, a=a, b=b):
            nrm = dual.value(t)
            return 0.5 * np.sum((t - v) ** 2) + a * nrm + b * nrm**2

        best = min((optimize.minimize(objective, start, method="Nelder-Mead",
                                      options={"xatol": 1e-10, "fatol": 1e-14, "maxiter": 20000})
                    for start in (v, np.zeros(5), got)), key=lambda res: res.fun)
        assert objective(got) <= best.fun + 1e-9, (a, b)


# ------------------------------------------------------------------------- gradient descent
def test_eps_zero_is_plain_gradient_descent() -> None:
    problem = _problem(d=3, n=20, reps=2)
    lr, steps = 0.05, 5
    path = list(linear.trajectory(problem, [0.0], "l2", lr=lr, steps=steps))
    theta = np.zeros((2, 3))
    for t in range(steps + 1):
        np.testing.assert_allclose(path[t][0], theta, atol=1e-12)
        r = problem.y - np.einsum("rnd,rd->rn", problem.x, theta)
        theta = theta + lr * 2 / 20 * np.einsum("rnd,rn->rd", problem.x, r)


@pytest.mark.parametrize("norm", NORMS)
def test_descent_reaches_the_adversarial_minimiser(norm: str) -> None:
    """The kinks of |rᵢ| (explicit subgradient) leave the iterates hovering around the minimiser
    in a neighbourhood that shrinks with the step size, as for any subgradient method."""
    problem = _problem(d=3, n=40, reps=1, seed=4)
    eps = 0.2

    def loss(t):
        return linear.empirical_adv_loss(problem, t[None], eps, norm)[0]

    def final(lr: float) -> np.ndarray:
        return list(linear.trajectory(problem, [eps], norm, lr=lr, steps=int(50 / lr)))[-1][0, 0]

    coarse, fine = final(0.1), final(0.01)
    best = optimize.minimize(loss, fine, method="Nelder-Mead",
                             options={"xatol": 1e-12, "fatol": 1e-15, "maxiter": 40000})
    assert loss(best.x) <= loss(fine) <= best.fun + 1e-5
    assert np.linalg.norm(fine - best.x) < 1e-3
    assert np.linalg.norm(fine - best.x) < 0.5 * np.linalg.norm(coarse - best.x)


@pytest.mark.parametrize("norm", NORMS)
def test_huge_eps_stays_at_zero_without_diverging(norm: str) -> None:
    """0 minimises the adversarial loss once ε is large; the step must not oscillate there."""
    problem = _problem(d=5, n=50, reps=4)
    path = np.stack(list(linear.trajectory(problem, [1e3], norm, lr=0.08, steps=50)))
    assert np.all(path == 0.0)


def test_fit_keeps_the_best_step_and_pairs_with_the_first_eps() -> None:
    problem = _problem(d=5, n=50, reps=6)
    lr, steps = linear.default_lr(5, 50), 60
    res = linear.fit(problem, [0.0, 0.05], "l2", lr=lr, steps=steps)
    path = np.stack(list(linear.trajectory(problem, [0.0, 0.05], "l2", lr=lr, steps=steps)))
    losses = linear.adv_test_loss(path, problem.theta0, 1.0, np.array([0.0, 0.05])[:, None], "l2")
    np.testing.assert_array_equal(res.stop, losses.argmin(axis=0))
    np.testing.assert_allclose(res.test_loss, losses.min(axis=0))
    np.testing.assert_allclose(res.rel_diff[1:, 0], 0.0)
    gap = np.linalg.norm(path[1:, 1] - path[1:, 0], axis=-1) / np.linalg.norm(path[1:, 0], axis=-1)
    np.testing.assert_allclose(res.rel_diff[1:, 1], gap)
    assert np.isnan(res.rel_diff[0]).all()


# ------------------------------------------------------------------------- p-values
def test_pvalues_are_leave_one_out() -> None:
    rng = np.random.default_rng(5)
    R, d = 25, 3
    clean = rng.standard_normal((R, d)) @ rng.standard_normal((d, d))
    runs = rng.standard_normal((2, R, d))
    m = R - 1
    for r in range(R):
        ref = np.delete(clean, r, axis=0)
        diff = runs[:, r] - ref.mean(axis=0)
        t2 = m / (m + 1) * np.einsum("ei,ij,ej->e", diff, np.linalg.inv(np.cov(ref.T)), diff)
        f = (m - d) / (d * (m - 1)) * t2
        two_sided = np.minimum(1, 2 * np.minimum(stats.f.cdf(f, d, m - d), stats.f.sf(f, d, m - d)))
        np.testing.assert_allclose(linear.hotelling_pvalues(clean, runs)[:, r], two_sided)
    losses, adv = rng.standard_normal(R), rng.standard_normal((2, R))
    ref = np.delete(losses, 0)
    t = (adv[:, 0] - ref.mean()) / (ref.std(ddof=1) * math.sqrt(1 + 1 / m))
    np.testing.assert_allclose(linear.loss_pvalues(losses, adv)[:, 0], stats.t.sf(t, m - 1))


def test_pvalues_are_uniform_for_clean_draws() -> None:
    rng = np.random.default_rng(6)
    samples = rng.standard_normal((400, 200, 4))  # 400 experiments of 200 clean runs
    p = np.concatenate([linear.hotelling_pvalues(s, s[None])[0] for s in samples])
    assert np.mean(p < 0.1) == pytest.approx(0.1, abs=0.01)
    assert np.mean(p < 0.5) == pytest.approx(0.5, abs=0.02)
    q = np.concatenate([linear.loss_pvalues(s[:, 0], s[None, :, 0])[0] for s in samples])
    assert np.mean(q < 0.1) == pytest.approx(0.1, abs=0.01)


# ------------------------------------------------------------------------- the phase transition
@pytest.mark.parametrize("d", [2, 5, 10])
def test_pvalues_collapse_between_small_and_large_eps(d: int) -> None:
    """n = 100, 300 repetitions: indistinguishable at ε = 0.1·√(d/n), clearly not at 10·√(d/n)."""
    c = _curves(d, 100, 300, [0.1, 10.0])
    assert c.pvalue_theta[0] > 0.1 and c.pvalue_loss[0] > 0.1
    assert c.pvalue_theta[1] < 0.01 and c.pvalue_loss[1] < 0.01


@pytest.mark.parametrize("norm", NORMS)
def test_trajectory_difference_increases_with_eps(norm: str) -> None:
    c = _curves(5, 100, 100, np.logspace(-2, 2, 9), norm)
    assert np.all(np.diff(c.traj_diff) >= 0)
    assert c.traj_diff[0] < 0.01 and c.traj_diff[-1] == pytest.approx(1.0)
    assert np.all(np.diff(c.adv_train_loss) >= 0)
    assert np.all(np.diff(c.step_diff[1:], axis=1) >= -1e-12)  # at every step, too


@pytest.mark.parametrize("norm", NORMS)
def test_overparameterised_regime(norm: str) -> None:
    """d > n: early stopping is what keeps clean GD from interpolating; the curves still work."""
    c = _curves(40, 20, 60, [0.01, 10.0], norm)
    assert 1 <= c.clean_stop < 100  # stopped early, not at the horizon
    assert c.clean_train_loss < c.threshold  # clean runs fit the noise: train < test loss
    assert c.pvalue_theta[0] > 0.1 and c.pvalue_loss[0] > 0.1
    assert c.pvalue_theta[1] < 0.01 and c.pvalue_loss[1] < 0.01
    assert np.all(np.isfinite(c.adv_train_loss))


def test_reproducible_from_the_seed() -> None:
    a, b = (_curves(3, 30, 20, [0.5, 2.0], seed=9) for _ in range(2))
    np.testing.assert_array_equal(a.adv_train_loss, b.adv_train_loss)
    np.testing.assert_array_equal(a.pvalue_theta, b.pvalue_theta)


# ------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("call", [
    lambda: linear.sample_problem(0, 10, 5, 1.0, np.random.default_rng(0)),
    lambda: linear.sample_problem(3, 10, 0, 1.0, np.random.default_rng(0)),
    lambda: linear.sample_problem(3, 10, 5, -1.0, np.random.default_rng(0)),
    lambda: linear.dual_norm("l1"),
    lambda: linear.fit(_problem(2, 10, 3), [0.0], "l2", lr=0.1, steps=0),
    lambda: linear.hotelling_pvalues(np.zeros((4, 3)), np.zeros((1, 4, 3))),
    lambda: linear.loss_pvalues(np.zeros(2), np.zeros((1, 2))),
])
def test_bad_input_is_a_config_error(call) -> None:
    with pytest.raises(ConfigError):
        call()
