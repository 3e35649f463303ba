"""Adversarial runs needed to find ε*, by search method (SPEC §4). Results: search.md.

Each "run" is one evaluation of an oracle loss curve R̂(θ̂(ε), ε), standing in for a from-scratch
adversarial training run. Methods, side by side on the same curves:

- ``bisection``: :class:`epsstar.sampler.BisectionSampler` (rtol 0.05) without any prior, with
  the clean point ``clean_train_loss``, and with the clean point plus a ``lower_guess``;
- ``grid``: the paper's doubling grid ε = 1, 2, 4, 8, … /255 (0.5, 0.25, … when 1/255 is
  already above) until a run brackets the crossing, then log-bisection of the bracket;
- ``tpe``: Optuna's TPESampler minimising |loss − R*(0)|;
- ``random``: ε drawn log-uniformly.

After every run the estimate is the piecewise-linear interpolation of the runs so far
(:func:`epsstar.estimate.interpolate_epsstar`, first bracketing pair, isotonic when needed);
grid, TPE and random search include the clean point (0, clean training loss) as the paper does.
The metric is the number of runs until that estimate is within 5 % and within 2 % of the
oracle ε* (brentq on the noise-free curve); a method that does not get there within 30 runs
counts as "> 30". Range [0.1, 64]/255; ε is in /255 units throughout (every method is
scale-free).

Curves:
- ``paper``: CIFAR-10 from-scratch losses (shared/paper/cifar10_scratch.csv), one curve per n:
  a monotone PCHIP interpolation through (eps_255, adv_train_loss), extended linearly past the
  last point; threshold = the eps = 0 row's adv_test_loss;
- ``paper-scaled``: the same two shapes with ε rescaled so that ε* ∈ {0.5, 1.5, 3.3, 8, 20, 40};
- ``synthetic``: linear, convex (u²) and concave (√u) curves, u = ε/ε*, through (0, 0.05) and
  (ε*, 0.44), ε* ∈ {0.5, 1.3, 3.3, 8, 20, 40};
- ``digits``: benchmarks/digits_curve.csv when it exists (same columns as the paper table);
- ``stress`` (separate table): exponential, hockey-stick, logistic and fourth-root shapes, far
  from the near-linear curves the sampler expects.

Noisy variant: the two paper curves plus Gaussian noise of sd 0.01 on every run (seed-to-seed
spread), 30 seeds each. Two workers: the sampler asked twice per round, both runs told at the end
of the round.

Usage:
    python benchmarks/search_efficiency.py             # ~1 min on 2 CPU cores
    python benchmarks/search_efficiency.py --seeds 10  # more seeds for TPE / random search
"""

from __future__ import annotations

import argparse
import csv
import math
import statistics
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import optuna
from scipy.interpolate import PchipInterpolator
from scipy.optimize import brentq

from epsstar.estimate import interpolate_epsstar
from epsstar.sampler import BisectionSampler

HERE = Path(__file__).resolve().parent
PAPER_CSV = HERE.parents[1] / "shared" / "paper" / "cifar10_scratch.csv"
DIGITS_CSV = HERE / "digits_curve.csv"

LOW, HIGH = 0.1, 64.0  # search range, /255
RTOL = 0.05  # the sampler's stopping tolerance
CAP = 30  # runs allowed per search
TOLERANCES = (0.05, 0.02)
NOISE_SD = 0.01  # seed-to-seed spread of the adversarial training loss
NOISY_SEEDS = 30

Points = list[tuple[float, float]]  # (ε /255, measured loss) in run order


# --------------------------------------------------------------------------- oracle curves
@dataclass(frozen=True)
class Curve:
    name: str
    family: str  # paper | paper-scaled | synthetic | digits
    loss: Callable[[float], float]  # noise-free R̂ at ε (/255)
    threshold: float  # R*(0)
    clean: float  # clean training loss, the curve at ε = 0
    root: float  # oracle ε* (/255)


def _with_root(name: str, family: str, loss, threshold: float, clean: float) -> Curve:
    root = brentq(lambda e: loss(e) - threshold, 1e-9, 1e4)
    return Curve(name, family, loss, threshold, clean, root)


def _pchip_curve(x: np.ndarray, y: np.ndarray) -> Callable[[float], float]:
    """Monotone cubic through the points, extended linearly past the last one (a cubic
    extrapolation would bend back down)."""
    pchip = PchipInterpolator(x, y, extrapolate=True)
    x_end, y_end, slope = float(x[-1]), float(y[-1]), float(pchip.derivative()(x[-1]))
    return lambda e: float(pchip(e)) if e <= x_end else y_end + slope * (e - x_end)


def table_curves(path: Path, family: str, key: str) -> list[Curve]:
    """One curve per ``key`` value (e.g. n) from a table with eps_255, adv_train_loss and the
    eps = 0 row's adv_test_loss as the threshold."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    curves = []
    for group in sorted({r.get(key, "") for r in rows}, key=lambda g: (len(g), g)):
        sub = [r for r in rows if r.get(key, "") == group]
        sub.sort(key=lambda r: float(r["eps_255"]))
        x = np.array([float(r["eps_255"]) for r in sub])
        y = np.array([float(r["adv_train_loss"]) for r in sub])
        clean_row = next(r for r in sub if float(r["eps_255"]) == 0)
        name = f"{family} n={group}" if group else family
        curves.append(
            _with_root(
                name, family, _pchip_curve(x, y), float(clean_row["adv_test_loss"]), float(y[0])
            )
        )
    return curves


def scaled(curve: Curve, root: float) -> Curve:
    """The same shape with ε stretched so that ε* = ``root``."""
    factor = curve.root / root
    return replace(
        curve,
        name=f"{curve.name} ε*→{root:g}",
        family="paper-scaled",
        loss=lambda e: curve.loss(e * factor),
        root=root,
    )


SHAPES = {"linear": lambda u: u, "convex": lambda u: u * u, "concave": math.sqrt}


# Shapes far from linear, to check that the sampler's safeguards hold (not in the main table).
STRESS_SHAPES = {
    "exponential": lambda u: (math.exp(math.log(9.8) * u) - 1) / 8.8,  # steep past ε*
    "hockey-stick": lambda u: max(0.0, u - 0.8) / 0.2,  # flat, then a kink at 0.8 ε*
    "logistic": lambda u: 2 * u**6 / (1 + u**6),  # a sharp step in log ε around ε*
    "fourth-root": lambda u: u**0.25,  # rises almost entirely below ε*
}


def synthetic_curves(
    roots: Iterable[float], shapes: dict = SHAPES, family: str = "synthetic"
) -> list[Curve]:
    """Curves clean + (R0 - clean)·g(ε/ε*) through (0, 0.05) and (ε*, 0.44)."""
    threshold, clean = 0.44, 0.05
    return [
        Curve(
            f"{shape} ε*={root:g}",
            family,
            lambda e, g=g, r=root: clean + (threshold - clean) * g(e / r),
            threshold,
            clean,
            root,
        )
        for shape, g in shapes.items()
        for root in roots
    ]


def all_curves() -> tuple[list[Curve], list[Curve], str]:
    """(noise-free curves, the paper curves for the noisy variant, a note on digits)."""
    paper = table_curves(PAPER_CSV, "paper", "n")
    curves = paper + [scaled(c, r) for c in paper for r in (0.5, 1.5, 3.3, 8, 20, 40)]
    curves += synthetic_curves((0.5, 1.3, 3.3, 8, 20, 40))
    if DIGITS_CSV.exists():
        curves += table_curves(DIGITS_CSV, "digits", "n")
        note = f"digits curve from {DIGITS_CSV.name} included"
    else:
        note = f"no {DIGITS_CSV.name}: digits curve skipped"
    return curves, paper, note


# --------------------------------------------------------------------------- methods
Observe = Callable[[float], float]  # one "adversarial training run" at ε /255 → loss


def run_bisection(
    curve: Curve,
    observe: Observe,
    *,
    clean: bool,
    lower_guess: float | None = None,
    workers: int = 1,
) -> Points:
    sampler = BisectionSampler(
        curve.threshold,
        LOW,
        HIGH,
        RTOL,
        clean_train_loss=curve.clean if clean else None,
        lower_guess=lower_guess,
    )
    study = optuna.create_study(direction="minimize", sampler=sampler)
    points: Points = []
    while sampler.stop_reason(study) is None and len(points) < CAP:
        trials = [study.ask() for _ in range(workers)]  # all RUNNING before any is told
        eps = [t.suggest_float("eps", LOW, HIGH, log=True) for t in trials]
        for trial, e in zip(trials, eps, strict=True):
            loss = observe(e)
            study.tell(trial, loss)
            points.append((e, loss))
    return points


def run_grid(curve: Curve, observe: Observe) -> Points:
    """1, 2, 4, … /255 (or 1/2, 1/4, … when 1/255 is above) until bracketed, then bisect the
    bracket in log ε until it is as narrow as the sampler's (relative width <= RTOL)."""
    points: Points = []
    lo, hi, eps = None, None, 1.0
    while len(points) < CAP and not (lo and hi and (hi - lo) / hi <= RTOL):
        loss = observe(eps)
        points.append((eps, loss))
        if loss <= curve.threshold:
            lo = max(lo or eps, eps)
        else:
            hi = min(hi or eps, eps)
        if hi is None and eps * 2 > HIGH or lo is None and eps / 2 < LOW:
            break  # ran off the range: the crossing is outside it
        if hi is None:
            eps = eps * 2
        elif lo is None:
            eps = eps / 2
        else:
            eps = math.sqrt(lo * hi)
    return points


def run_tpe(curve: Curve, observe: Observe, seed: int) -> Points:
    study = optuna.create_study(sampler=optuna.samplers.TPESampler(seed=seed))
    points: Points = []
    for _ in range(CAP):
        trial = study.ask()
        eps = trial.suggest_float("eps", LOW, HIGH, log=True)
        loss = observe(eps)
        study.tell(trial, abs(loss - curve.threshold))
        points.append((eps, loss))
    return points


def run_random(curve: Curve, observe: Observe, seed: int) -> Points:
    rng = np.random.default_rng(seed)
    eps = np.exp(rng.uniform(math.log(LOW), math.log(HIGH), CAP))
    return [(float(e), observe(float(e))) for e in eps]


# --------------------------------------------------------------------------- metrics
def runs_to(
    points: Points, curve: Curve, tol: float, *, clean: bool, per_round: int = 1
) -> int | None:
    """Rounds (runs when ``per_round`` = 1) until the interpolated estimate is within ``tol``
    (relative) of the oracle ε*; None if it never is."""
    for k in range(per_round, len(points) + 1, per_round):
        eps, losses = zip(*points[:k], strict=True)
        est = interpolate_epsstar(
            eps, losses, curve.threshold, clean_train_loss=curve.clean if clean else None
        )
        if est.bound is None and abs(est.epsstar - curve.root) <= tol * curve.root:
            return k // per_round
    return None


def final_error(points: Points, curve: Curve, *, clean: bool) -> float:
    eps, losses = zip(*points, strict=True)
    est = interpolate_epsstar(
        eps, losses, curve.threshold, clean_train_loss=curve.clean if clean else None
    )
    return abs(est.epsstar - curve.root) / curve.root if est.bound is None else math.inf


def summary(values: list[int | None]) -> tuple[float, int | None, float]:
    """(median, worst, fraction reached); a miss counts as CAP + 1 in the median, None worst."""
    filled = [CAP + 1 if v is None else v for v in values]
    worst = None if None in values else max(values)
    return statistics.median(filled), worst, 1 - values.count(None) / len(values)


def fmt(stat: tuple[float, int | None, float]) -> str:
    median, worst, reached = stat
    med = f">{CAP}" if median > CAP else f"{median:g}"
    return f"{med} / {'>' + str(CAP) if worst is None else worst}" + (
        "" if reached == 1 else f" ({reached:.0%} reach)"
    )


# --------------------------------------------------------------------------- experiments
@dataclass(frozen=True)
class Method:
    name: str
    prior: str
    clean: bool  # whether its estimate includes the clean point
    run: Callable[[Curve, Observe, int], Points]
    seeded: bool  # results depend on the seed even without noise
    stops: bool = True  # False: no stopping rule, it spends the whole budget of CAP runs


def lower_guess_for(curve: Curve, seed: int) -> float:
    """A lower guess 2-10× below ε*, as attacking the clean model gives (deterministic)."""
    rng = np.random.default_rng(1000 + seed)
    return max(LOW, curve.root * 10 ** rng.uniform(-1.0, -0.3))


METHODS = [
    Method("bisection", "none", False, lambda c, o, s: run_bisection(c, o, clean=False), False),
    Method("bisection", "clean loss", True, lambda c, o, s: run_bisection(c, o, clean=True), False),
    Method(
        "bisection",
        "clean loss + lower guess",
        True,
        lambda c, o, s: run_bisection(c, o, clean=True, lower_guess=lower_guess_for(c, s)),
        True,
    ),
    Method("doubling grid (paper)", "clean loss", True, lambda c, o, s: run_grid(c, o), False),
    Method("TPE on abs(loss − R0)", "clean loss", True, run_tpe, True, stops=False),
    Method("random (log-uniform)", "clean loss", True, run_random, True, stops=False),
]


def noise_free(curves: list[Curve], seeds: int) -> dict[str, dict]:
    out = {}
    for m in METHODS:
        counts = {tol: [] for tol in TOLERANCES}
        stops = []
        for curve in curves:
            for seed in range(seeds if m.seeded else 1):
                points = m.run(curve, curve.loss, seed)
                for tol in TOLERANCES:
                    counts[tol].append(runs_to(points, curve, tol, clean=m.clean))
                stops.append(len(points))
        out[f"{m.name} | {m.prior}"] = {"counts": counts, "stops": stops if m.stops else None}
    return out


def noisy(curve: Curve) -> dict[str, dict]:
    slope = (curve.loss(curve.root * 1.001) - curve.loss(curve.root * 0.999)) / (0.002 * curve.root)
    implied = NOISE_SD / slope / curve.root  # relative ε error of one noise sd
    out = {}
    for m in METHODS:
        counts = {tol: [] for tol in TOLERANCES}
        stops, errors = [], []
        for seed in range(NOISY_SEEDS):
            rng = np.random.default_rng(seed)

            def observe(e: float, rng=rng) -> float:
                return curve.loss(e) + NOISE_SD * rng.standard_normal()

            points = m.run(curve, observe, seed)
            for tol in TOLERANCES:
                counts[tol].append(runs_to(points, curve, tol, clean=m.clean))
            stops.append(len(points))
            errors.append(final_error(points, curve, clean=m.clean))
        out[f"{m.name} | {m.prior}"] = {
            "counts": counts,
            "stops": stops if m.stops else None,
            "error": f"{statistics.median(errors):.1%} / {np.percentile(errors, 90):.1%}",
        }
    return out, implied


def two_workers(curves: list[Curve]) -> dict[str, dict]:
    out = {}
    for workers in (1, 2):
        stops, to2, clashes = [], [], 0
        for curve in curves:
            points = run_bisection(curve, curve.loss, clean=True, workers=workers)
            stops.append(math.ceil(len(points) / workers))
            to2.append(runs_to(points, curve, 0.02, clean=True, per_round=workers))
            eps = [e for e, _ in points]  # a clash: an ε within 0.5 % of an earlier one
            clashes += sum(any(abs(e - d) <= 0.005 * d for d in eps[:i]) for i, e in enumerate(eps))
        out[workers] = {"rounds_stop": stops, "rounds_2pct": to2, "clashes": clashes}
    return out


# --------------------------------------------------------------------------- report
def print_counts(title: str, results: dict[str, dict]) -> None:
    errors = all("error" in r for r in results.values())
    print(f"\n### {title}\n")
    print(
        "| method | prior | runs to 5 % (median / worst) | runs to 2 % (median / worst) |"
        " runs made (median / worst) |" + (" final error (median / p90) |" if errors else "")
    )
    print("|---|---|---|---|---|" + ("---|" if errors else ""))
    for key, r in results.items():
        name, prior = key.split(" | ")
        stops = (
            f"{statistics.median(r['stops']):g} / {max(r['stops'])}"
            if r["stops"]
            else f"{CAP} (no stopping rule)"
        )
        cells = [
            name,
            prior,
            fmt(summary(r["counts"][0.05])),
            fmt(summary(r["counts"][0.02])),
            stops,
        ] + ([r["error"]] if errors else [])
        print("| " + " | ".join(cells) + " |")


def print_targets(results: dict[str, dict]) -> None:
    ours = results["bisection | none"]["counts"]
    print("\nTargets (noise-free, no prior):")
    med2, worst2, _ = summary(ours[0.02])
    print(f"- within 2 %: median {med2:g} runs (target <= 4), worst {worst2} (target <= 6)")
    for other, target in (
        ("TPE on abs(loss − R0) | clean loss", 3.0),
        ("doubling grid (paper) | clean loss", 1.5),
    ):
        for tol in TOLERANCES:
            ratio = summary(results[other]["counts"][tol])[0] / summary(ours[tol])[0]
            print(
                f"- {other.split(' | ')[0]} / bisection, median runs to {tol:.0%}: "
                f"{ratio:.2f}x (target >= {target:g}x)"
            )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--seeds",
        type=int,
        default=5,
        help="seeds per curve for the seeded methods (TPE, random, lower guess)",
    )
    args = p.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    start = time.perf_counter()
    curves, paper, note = all_curves()
    print(
        f"{len(curves)} noise-free curves ({note}); paper ε*: "
        + ", ".join(f"{c.name} {c.root:.3f}/255" for c in paper)
    )

    clean_results = noise_free(curves, args.seeds)
    print_counts(
        f"Noise-free: {len(curves)} curves, seeded methods × {args.seeds} seeds", clean_results
    )
    print_targets(clean_results)
    stress = synthetic_curves((0.5, 3.3, 20), STRESS_SHAPES, "stress")
    print_counts(
        f"Stress shapes ({', '.join(STRESS_SHAPES)}), ε* ∈ {{0.5, 3.3, 20}}/255, noise-free",
        noise_free(stress, args.seeds),
    )

    for curve in paper:
        results, implied = noisy(curve)
        print_counts(
            f"Noisy (sd {NOISE_SD}), {curve.name} (ε* = {curve.root:.3f}/255), "
            f"{NOISY_SEEDS} seeds: one noise sd is a {implied:.1%} error in ε",
            results,
        )

    workers = two_workers(curves)
    print(f"\n### One vs two workers (bisection, clean loss, {len(curves)} noise-free curves)\n")
    print(
        "| workers | rounds to 2 % (median / worst) | rounds to stop (median / worst) |"
        " runs repeating an earlier ε |"
    )
    print("|---|---|---|---|")
    for k, r in workers.items():
        stops = f"{statistics.median(r['rounds_stop']):g} / {max(r['rounds_stop'])}"
        print(f"| {k} | {fmt(summary(r['rounds_2pct']))} | {stops} | {r['clashes']} |")
    print(f"\n({time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()
