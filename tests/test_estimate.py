"""ε* estimators (SPEC §3, §5): the paper's published numbers, edge cases, intervals, validation."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np
import pytest
from scipy.stats import t as student_t

from epsstar.config import ConfigError
from epsstar.estimate import (
    Estimate,
    bootstrap_epsstar,
    extrapolate_epsstar,
    interpolate_epsstar,
)

PAPER = Path(__file__).parents[2] / "shared" / "paper"
R0_10K = 0.441  # R*(0), CIFAR-10 PreActResNet18 n = 10,000 (SPEC §3)
CLEAN_TRAIN_10K = 0.0403


def _rows(name: str, **where: str) -> list[dict[str, str]]:
    with open(PAPER / name, newline="") as f:
        return [r for r in csv.DictReader(f) if all(r[k] == v for k, v in where.items())]


def _xy(rows: list[dict[str, str]]) -> tuple[list[float], list[float]]:
    return [float(r["eps_255"]) for r in rows], [float(r["adv_train_loss"]) for r in rows]


# ------------------------------------------------------------------ paper numbers (SPEC §3, §5)


def test_scratch_n10000_reproduces_paper() -> None:
    rows = _rows("cifar10_scratch.csv", n="10000")
    threshold = float(next(r for r in rows if r["eps_255"] == "0")["adv_test_loss"])
    est = interpolate_epsstar(*_xy(rows), threshold)
    assert threshold == R0_10K
    assert est.epsstar == pytest.approx(2 + 6 * (0.441 - 0.2199) / (1.2186 - 0.2199))
    assert round(est.epsstar, 2) == 3.33
    assert (est.lower, est.upper, est.bound, est.method) == (2.0, 8.0, None, "interpolation")
    assert est.isotonic is False


def test_scratch_n50000_reproduces_paper_with_clean_point_as_row_or_argument() -> None:
    rows = _rows("cifar10_scratch.csv", n="50000")
    clean = next(r for r in rows if r["eps_255"] == "0")
    threshold = float(clean["adv_test_loss"])
    as_row = interpolate_epsstar(*_xy(rows), threshold)
    tuned = [r for r in rows if r is not clean]
    as_arg = interpolate_epsstar(
        *_xy(tuned), threshold, clean_train_loss=float(clean["adv_train_loss"])
    )
    # R*(0) = 0.1837 lies between 0.1802 (ε = 0.5) and 0.2148 (ε = 1)
    assert as_row.epsstar == pytest.approx(0.5 + 0.5 * (0.1837 - 0.1802) / (0.2148 - 0.1802))
    assert round(as_row.epsstar, 2) == 0.55
    assert as_arg == as_row


@pytest.mark.parametrize(
    ("attack", "only_eps", "published", "method"),
    [
        ("pgd", None, 2.50, "extrapolation"),
        ("pgd", 0.5, 4.70, "extrapolation-1pt"),
        ("fgm", None, 2.08, "extrapolation"),
        ("fgm", 0.5, 1.73, "extrapolation-1pt"),
    ],
)
def test_finetune_reproduces_paper(
    attack: str, only_eps: float | None, published: float, method: str
) -> None:
    rows = _rows("cifar10_finetune.csv", attack=attack)
    if only_eps is not None:
        rows = [r for r in rows if float(r["eps_255"]) == only_eps]
    clean = float(_rows("cifar10_finetune.csv", attack="none")[0]["adv_train_loss"])
    est = extrapolate_epsstar(*_xy(rows), clean, R0_10K)
    assert clean == CLEAN_TRAIN_10K
    assert round(est.epsstar, 2) == published
    assert (est.method, est.bound) == (method, None)


# ------------------------------------------------------------------ interpolation


def test_seeds_at_one_eps_are_averaged() -> None:
    repeated = interpolate_epsstar([1, 1, 2, 3, 3], [0.1, 0.3, 0.4, 0.5, 0.9], 0.5)
    means = interpolate_epsstar([1, 2, 3], [0.2, 0.4, 0.7], 0.5)
    assert repeated == means
    assert repeated.epsstar == pytest.approx(2 + (0.5 - 0.4) / (0.7 - 0.4))


def test_clean_point_brackets_a_crossing_below_the_smallest_eps() -> None:
    without = interpolate_epsstar([1, 2], [0.3, 0.6], 0.2)
    with_clean = interpolate_epsstar([1, 2], [0.3, 0.6], 0.2, clean_train_loss=0.1)
    assert without.bound == "below"
    assert with_clean.bound is None
    assert with_clean.epsstar == pytest.approx(0.5)
    assert (with_clean.lower, with_clean.upper) == (0.0, 1.0)


def test_loss_equal_to_threshold_counts_as_at_or_below() -> None:
    est = interpolate_epsstar([1, 2, 3], [0.1, 0.5, 0.9], 0.5)
    assert (est.epsstar, est.lower, est.upper) == (2.0, 2.0, 3.0)


def test_unsorted_input_is_read_in_eps_order() -> None:
    est = interpolate_epsstar([8, 1, 2], [1.2186, 0.1586, 0.2199], R0_10K)
    assert round(est.epsstar, 2) == 3.33


def test_non_monotone_curve_is_made_isotonic_and_flagged() -> None:
    # the dip at ε = 2 is seed noise: pooled with ε = 1 it gives 0.35 at both
    est = interpolate_epsstar([1, 2, 3, 4], [0.4, 0.3, 0.6, 0.8], 0.5)
    assert est.isotonic is True
    assert est.epsstar == pytest.approx(2 + (0.5 - 0.35) / (0.6 - 0.35))
    assert (est.lower, est.upper) == (2.0, 3.0)


def test_isotonic_pooling_weights_eps_by_number_of_runs() -> None:
    # ε = 1 has three runs at 0.4, ε = 2 one run at 0.2: weighted pool = (3·0.4 + 0.2)/4 = 0.35
    est = interpolate_epsstar([1, 1, 1, 2, 3], [0.4, 0.4, 0.4, 0.2, 0.75], 0.5)
    assert est.isotonic is True
    assert est.epsstar == pytest.approx(2 + (0.5 - 0.35) / (0.75 - 0.35))


def test_flat_curve_is_monotone_not_isotonic() -> None:
    assert interpolate_epsstar([1, 2, 3], [0.2, 0.2, 0.9], 0.5).isotonic is False


def test_every_eps_below_threshold_is_a_lower_bound() -> None:
    est = interpolate_epsstar([1, 2, 4], [0.1, 0.2, 0.3], 0.5)
    assert est == Estimate(4.0, 4.0, math.inf, "above", "interpolation", 0.5)


@pytest.mark.parametrize("clean", [None, 0.05])
def test_smallest_eps_above_threshold_is_an_upper_bound(clean: float | None) -> None:
    est = interpolate_epsstar([1, 2, 4], [0.6, 0.7, 0.9], 0.5, clean_train_loss=clean)
    if clean is None:
        assert est == Estimate(1.0, 0.0, 1.0, "below", "interpolation", 0.5)
    else:  # the clean point at 0 is below: a proper crossing in [0, 1]
        assert est.bound is None and 0 < est.epsstar < 1


def test_results_are_plain_floats() -> None:
    est = interpolate_epsstar(np.array([1.0, 2.0]), np.array([0.1, 0.9]), 0.5)
    assert type(est.epsstar) is float and type(est.lower) is float


@pytest.mark.parametrize(
    ("eps", "losses", "threshold", "message"),
    [
        ([1, 2], [0.1], 0.5, "2 eps values but 1 losses"),
        ([], [], 0.5, "no (eps, loss) points"),
        ([1, float("nan")], [0.1, 0.2], 0.5, "finite"),
        ([1, 2], [0.1, float("inf")], 0.5, "finite"),
        ([-1, 2], [0.1, 0.2], 0.5, "eps must be >= 0"),
        ([1, 2], [0.1, 0.2], float("nan"), "threshold must be a finite number"),
    ],
)
def test_interpolation_rejects_bad_input(
    eps: list[float], losses: list[float], threshold: float, message: str
) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        interpolate_epsstar(eps, losses, threshold)


def test_interpolation_rejects_non_finite_clean_loss() -> None:
    with pytest.raises(ConfigError, match="clean_train_loss"):
        interpolate_epsstar([1, 2], [0.1, 0.9], 0.5, clean_train_loss=float("nan"))


# ------------------------------------------------------------------ bootstrap


def _noisy_seeds(seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    eps = np.repeat([1.0, 2.0, 4.0, 8.0], 4)
    return eps, 0.05 + 0.1 * eps + rng.normal(0, 0.03, eps.size)


@pytest.mark.parametrize("clean", [None, 0.02])
def test_bootstrap_interval_contains_point_estimate(clean: float | None) -> None:
    eps, losses = _noisy_seeds()
    point = interpolate_epsstar(eps, losses, 0.5, clean_train_loss=clean).epsstar
    lo, hi = bootstrap_epsstar(eps, losses, 0.5, clean_train_loss=clean, n_boot=300)
    assert lo < point < hi
    assert 4.0 <= lo and hi <= 8.0  # the crossing stays in the measured bracket


def test_bootstrap_is_seeded_and_wider_at_higher_level() -> None:
    eps, losses = _noisy_seeds()
    narrow = bootstrap_epsstar(eps, losses, 0.5, n_boot=300, seed=3, level=0.5)
    assert narrow == bootstrap_epsstar(eps, losses, 0.5, n_boot=300, seed=3, level=0.5)
    wide = bootstrap_epsstar(eps, losses, 0.5, n_boot=300, seed=3, level=0.95)
    assert wide[0] < narrow[0] and narrow[1] < wide[1]


def test_bootstrap_of_identical_seeds_has_no_spread() -> None:
    eps, losses = [1, 1, 2, 2], [0.2, 0.2, 0.8, 0.8]
    point = interpolate_epsstar(eps, losses, 0.5).epsstar
    assert bootstrap_epsstar(eps, losses, 0.5, n_boot=50) == pytest.approx((point, point))


def test_bootstrap_with_clean_runs_at_zero_holds_clean_point_fixed() -> None:
    # runs at ε = 0 exist, and the clean point joins them as one more run
    eps, losses = [0, 0, 1, 1], [0.1, 0.1, 0.9, 0.9]
    point = interpolate_epsstar(eps, losses, 0.5, clean_train_loss=0.4).epsstar
    lo, hi = bootstrap_epsstar(eps, losses, 0.5, clean_train_loss=0.4, n_boot=50)
    assert point == pytest.approx(0.3 / 0.7)  # mean at 0 is (0.1 + 0.1 + 0.4)/3 = 0.2
    assert (lo, hi) == pytest.approx((point, point))


def test_bootstrap_needs_repeated_seeds() -> None:
    with pytest.raises(ConfigError, match="two or more runs"):
        bootstrap_epsstar([1, 2, 4], [0.1, 0.3, 0.9], 0.5)


@pytest.mark.parametrize(("n_boot", "level"), [(0, 0.9), (10, 1.0), (10, 0.0)])
def test_bootstrap_rejects_bad_settings(n_boot: int, level: float) -> None:
    with pytest.raises(ConfigError, match="n_boot"):
        bootstrap_epsstar([1, 1, 2], [0.1, 0.2, 0.9], 0.5, n_boot=n_boot, level=level)


# ------------------------------------------------------------------ extrapolation


def test_collinear_points_give_exact_root_and_no_spread() -> None:
    est = extrapolate_epsstar([1, 2, 3], [0.3, 0.5, 0.7], 0.1, 0.6)
    assert est.epsstar == pytest.approx(2.5)
    assert est.lower == pytest.approx(2.5) and est.upper == pytest.approx(2.5)


def test_one_point_line_passes_through_both_points() -> None:
    est = extrapolate_epsstar([0.5], [0.0829], CLEAN_TRAIN_10K, R0_10K)
    assert est.epsstar == pytest.approx((R0_10K - 0.0403) / ((0.0829 - 0.0403) / 0.5))
    assert est.lower == est.upper == est.epsstar
    # several seeds at the one ε are still a one-point estimate (through their mean)
    seeds = extrapolate_epsstar([0.5, 0.5], [0.0729, 0.0929], CLEAN_TRAIN_10K, R0_10K)
    assert seeds.method == "extrapolation-1pt"
    assert seeds.epsstar == pytest.approx(est.epsstar)


def test_fieller_interval_ends_are_where_the_line_is_just_significant() -> None:
    eps, losses = [0.25, 0.5, 1.0], [0.0426, 0.0829, 0.2008]
    est = extrapolate_epsstar(eps, losses, CLEAN_TRAIN_10K, R0_10K, level=0.9)
    x = np.array([0.0, *eps])
    y = np.array([CLEAN_TRAIN_10K, *losses])
    slope, intercept = np.polyfit(x, y, 1)
    s2 = ((y - intercept - slope * x) ** 2).sum() / (x.size - 2)
    tq = student_t.ppf(0.95, x.size - 2)
    for end in (est.lower, est.upper):
        gap = abs(R0_10K - intercept - slope * end)
        se = math.sqrt(s2 * (1 / x.size + (end - x.mean()) ** 2 / ((x - x.mean()) ** 2).sum()))
        assert gap == pytest.approx(tq * se)
    assert est.lower < est.epsstar < est.upper
    wider = extrapolate_epsstar(eps, losses, CLEAN_TRAIN_10K, R0_10K, level=0.99)
    assert wider.lower < est.lower and est.upper < wider.upper


def test_insignificant_slope_gives_unbounded_interval() -> None:
    est = extrapolate_epsstar([1, 2, 3], [0.6, 0.05, 0.5], 0.1, 1.0)
    assert est.bound is None and est.epsstar > 0
    assert (est.lower, est.upper) == (0.0, math.inf)


def test_falling_line_is_a_lower_bound() -> None:
    est = extrapolate_epsstar([1, 2], [0.1, 0.05], 0.2, 0.5)
    assert est == Estimate(2.0, 2.0, math.inf, "above", "extrapolation", 0.5)


def test_line_above_threshold_at_zero_is_an_upper_bound() -> None:
    est = extrapolate_epsstar([0.5, 1], [0.7, 0.9], 0.6, 0.5)
    assert est == Estimate(0.5, 0.0, 0.5, "below", "extrapolation", 0.5)


@pytest.mark.parametrize(
    ("eps", "losses", "clean", "message"),
    [
        ([0.0, 1.0], [0.1, 0.2], 0.05, "fine-tuned eps must be > 0"),
        ([1.0], [0.1, 0.2], 0.05, "1 eps values but 2 losses"),
        ([], [], 0.05, "no"),
        ([1.0], [0.2], float("inf"), "clean_train_loss"),
    ],
)
def test_extrapolation_rejects_bad_input(
    eps: list[float], losses: list[float], clean: float, message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        extrapolate_epsstar(eps, losses, clean, 0.5)
