"""BisectionSampler (SPEC §4): few runs to ε*, edge cases, noise, failures, workers, restarts.

Every study here is in-memory and its objective is an oracle curve, so the whole file runs in a
few seconds. ε is in pixel units throughout (the oracles are written in /255 for readability).
"""

from __future__ import annotations

import doctest
import math
import statistics
import threading
import time
from collections.abc import Callable

import numpy as np
import optuna
import pytest

from epsstar import sampler as sampler_module
from epsstar.config import ConfigError
from epsstar.estimate import interpolate_epsstar
from epsstar.sampler import (
    EPS_ATTR,
    BisectionSampler,
    ensure_compatible,
    estimate_from_study,
    study_settings,
)

optuna.logging.set_verbosity(optuna.logging.WARNING)

LOW, HIGH = 0.1 / 255, 64 / 255  # search range, pixel units
R0 = 0.44  # threshold R*(0)
CLEAN = 0.05  # clean training loss, the curve's value at ε = 0
ROOTS_255 = (0.5, 0.8, 1.3, 2.0, 3.3, 5.0, 8.0, 13.0, 20.0, 30.0, 40.0)
SHAPES = {  # loss at ε as a function of u = ε / ε*: all pass (0, CLEAN) and (ε*, R0)
    "linear": lambda u: u,
    "convex": lambda u: u**2,
    "concave": lambda u: math.sqrt(u),
}

Oracle = Callable[[float], float]


def oracle(shape: str, root_255: float) -> Oracle:
    """Noise-free adversarial training loss against ε (pixel units), crossing R0 at root/255."""
    g = SHAPES[shape]
    return lambda eps: CLEAN + (R0 - CLEAN) * g(eps * 255 / root_255)


def make_study(sampler: BisectionSampler, **kwargs) -> optuna.Study:
    study = optuna.create_study(direction="minimize", sampler=sampler, **kwargs)
    sampler.check_study(study)
    return study


def objective_for(f: Oracle) -> Callable[[optuna.Trial], float]:
    return lambda trial: f(trial.suggest_float("eps", LOW, HIGH, log=True))


def completed(study: optuna.Study) -> list[tuple[float, float]]:
    """(ε, loss) of the completed trials in the order they ran."""
    done = study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
    return [(t.params["eps"], t.value) for t in sorted(done, key=lambda t: t.number)]


def runs_until_within(points, root: float, rtol: float, clean: float | None) -> int | None:
    """How many runs until the interpolated estimate is within ``rtol`` of ``root``."""
    for k in range(1, len(points) + 1):
        eps, losses = zip(*points[:k], strict=True)
        est = interpolate_epsstar(eps, losses, R0, clean_train_loss=clean)
        if est.bound is None and abs(est.epsstar - root) <= rtol * root:
            return k
    return None


def search(f: Oracle, **kwargs) -> optuna.Study:
    study = make_study(BisectionSampler(R0, LOW, HIGH, **kwargs))
    study.optimize(objective_for(f), n_trials=30)
    return study


# ------------------------------------------------------------------ few runs, noise-free


def _sweep(clean: float | None) -> list[tuple[int, int]]:
    """(runs until within 2%, runs until the study stopped itself) for every shape and ε*."""
    results = []
    for shape in SHAPES:
        for root_255 in ROOTS_255:
            root = root_255 / 255
            study = search(oracle(shape, root_255), clean_train_loss=clean)
            points = completed(study)
            est = estimate_from_study(study)
            assert study.user_attrs["sampler"] == "BisectionSampler"
            assert abs(est.epsstar - root) <= 0.02 * root, (shape, root_255, est)
            assert est.lower <= root <= est.upper, (shape, root_255, est)
            assert len(study.trials) <= 6, (shape, root_255, points)
            results.append((runs_until_within(points, root, 0.02, clean), len(study.trials)))
    return results


def test_noise_free_oracles_converge_within_2_percent_in_few_runs() -> None:
    results = _sweep(clean=None)
    to_2pct = [k for k, _ in results]
    assert max(to_2pct) <= 6
    assert statistics.median(to_2pct) <= 4


def test_clean_train_loss_saves_runs() -> None:
    without = _sweep(clean=None)
    with_clean = _sweep(clean=CLEAN)
    assert sum(n for _, n in with_clean) < sum(n for _, n in without)
    assert sum(k for k, _ in with_clean) < sum(k for k, _ in without)


def test_search_stops_itself_when_the_bracket_is_within_rtol() -> None:
    study = search(oracle("linear", 3.3), rtol=0.05)
    sampler = study.sampler
    assert sampler.stop_reason(study) == "converged"
    est = estimate_from_study(study)
    assert (est.upper - est.lower) / est.upper <= 0.05
    assert len(study.trials) < 30  # optimize returned early: study.stop() was called


def test_tighter_rtol_gives_a_tighter_bracket() -> None:
    loose = estimate_from_study(search(oracle("convex", 5.0), rtol=0.1))
    tight = estimate_from_study(search(oracle("convex", 5.0), rtol=0.01))
    assert (tight.upper - tight.lower) / tight.upper <= 0.01
    assert (tight.upper - tight.lower) < (loose.upper - loose.lower)


# ------------------------------------------------------------------ outside the range


def test_crossing_above_the_range_is_a_bound_above() -> None:
    study = search(oracle("linear", 100.0))
    est = estimate_from_study(study)
    assert study.sampler.stop_reason(study) == "above_range"
    assert est.bound == "above"
    assert est.lower == pytest.approx(HIGH)  # the last run was at eps_high, still below R0
    assert len(study.trials) <= 5


def test_crossing_below_the_range_is_a_bound_below() -> None:
    study = search(oracle("linear", 0.05))
    est = estimate_from_study(study)
    assert study.sampler.stop_reason(study) == "below_range"
    assert est.bound == "below"
    assert est.upper == pytest.approx(LOW)
    assert len(study.trials) <= 5


def test_below_the_range_with_the_clean_point_interpolates_from_zero() -> None:
    # SPEC §3 includes the clean run as (0, clean loss): the crossing is then bracketed by
    # ε = 0 and eps_low, and reported as an interpolation rather than a bound.
    study = search(oracle("linear", 0.05), clean_train_loss=CLEAN)
    est = estimate_from_study(study)
    assert study.sampler.stop_reason(study) == "below_range"
    assert est.bound is None and est.lower == 0.0 and est.upper == pytest.approx(LOW)
    assert est.epsstar == pytest.approx(0.05 / 255)


def test_clean_run_above_the_threshold_ends_the_search_before_any_run() -> None:
    # no generalisation gap at ε = 0: ε* = sup{ε : R̂ <= R*(0)} lies below every ε > 0
    sampler = BisectionSampler(R0, LOW, HIGH, clean_train_loss=R0 + 0.01)
    study = make_study(sampler)
    assert sampler.stop_reason(study) == "below_range"
    calls = []
    study.optimize(lambda t: calls.append(_suggest(t)) or 0.0, n_trials=5)
    assert calls == [] and study.trials[0].state == optuna.trial.TrialState.PRUNED
    assert estimate_from_study(study).bound == "below"


def test_max_trials_stops_the_search() -> None:
    study = search(oracle("convex", 3.3), max_trials=2, rtol=1e-4)
    assert len(study.trials) == 2
    assert study.sampler.stop_reason(study) == "max_trials"


def test_trial_asked_after_the_search_is_over_is_pruned_before_training() -> None:
    f = oracle("linear", 3.3)
    study = search(f)
    calls = []

    def objective(trial: optuna.Trial) -> float:
        eps = trial.suggest_float("eps", LOW, HIGH, log=True)
        calls.append(eps)  # reached only if the sampler lets a run start
        return f(eps)

    n_before = len(study.trials)
    study.optimize(objective, n_trials=5)
    assert calls == []
    assert len(study.trials) == n_before + 1
    assert study.trials[-1].state == optuna.trial.TrialState.PRUNED


# ------------------------------------------------------------------ noise and failures


def test_noisy_oracle_converges_to_the_noise_limited_accuracy() -> None:
    root_255, sd = 3.3, 0.01
    f = oracle("linear", root_255)
    slope = (R0 - CLEAN) / (root_255 / 255)  # loss per pixel-unit ε
    errors = []
    for seed in range(10):
        rng = np.random.default_rng(seed)
        study = search(lambda e, rng=rng: f(e) + sd * rng.standard_normal(), clean_train_loss=CLEAN)
        assert study.sampler.stop_reason(study) == "converged"
        assert len(study.trials) <= 12
        errors.append(abs(estimate_from_study(study).epsstar - root_255 / 255))
    # an error of k noise standard deviations in loss is k·sd/slope in ε
    assert max(errors) <= 3 * sd / slope
    assert statistics.median(errors) <= 1.5 * sd / slope


def test_non_monotone_pair_does_not_derail_the_search() -> None:
    # two early runs whose noise inverts their order: the isotonic view pools them
    f = oracle("linear", 3.3)
    study = make_study(BisectionSampler(R0, LOW, HIGH, clean_train_loss=CLEAN))
    for eps, loss in ((1.0 / 255, f(1.5 / 255)), (1.5 / 255, f(1.0 / 255))):
        study.add_trial(
            optuna.trial.create_trial(
                params={"eps": eps},
                distributions={"eps": optuna.distributions.FloatDistribution(LOW, HIGH, log=True)},
                value=loss,
            )
        )
    study.optimize(objective_for(f), n_trials=30)
    est = estimate_from_study(study)
    assert study.sampler.stop_reason(study) == "converged"
    assert est.epsstar == pytest.approx(3.3 / 255, rel=0.02)
    assert len(study.trials) <= 2 + 6


def test_nan_objective_fails_the_trial_and_is_ignored() -> None:
    f = oracle("concave", 5.0)
    calls = []

    def objective(trial: optuna.Trial) -> float:
        eps = trial.suggest_float("eps", LOW, HIGH, log=True)
        calls.append(eps)
        return math.nan if len(calls) == 1 else f(eps)  # the first run diverged

    study = make_study(BisectionSampler(R0, LOW, HIGH))
    study.optimize(objective, n_trials=30)
    first = study.trials[0]
    assert first.state == optuna.trial.TrialState.FAIL
    assert study.sampler.stop_reason(study) == "converged"
    assert estimate_from_study(study).epsstar == pytest.approx(5.0 / 255, rel=0.02)
    # the failed run is ignored: the search then behaves as if it never happened
    clean_run = search(f)
    assert [t.params["eps"] for t in study.trials[1:]] == pytest.approx(
        [t.params["eps"] for t in clean_run.trials]
    )


def test_infinite_loss_is_ignored_like_a_failure() -> None:
    study = make_study(BisectionSampler(R0, LOW, HIGH))
    trial = study.ask()
    trial.suggest_float("eps", LOW, HIGH, log=True)
    study.tell(trial, math.inf)
    assert study.trials[0].state == optuna.trial.TrialState.COMPLETE
    with pytest.raises(ConfigError, match="no completed trial"):
        estimate_from_study(study)


# ------------------------------------------------------------------ workers and restarts


def _suggest(trial: optuna.Trial) -> float:
    return trial.suggest_float("eps", LOW, HIGH, log=True)


@pytest.mark.parametrize("clean", [None, CLEAN])
def test_two_workers_never_share_an_eps_and_need_fewer_rounds(clean: float | None) -> None:
    rounds_one, rounds_two = [], []
    for shape in SHAPES:
        for root_255 in (0.8, 3.3, 20.0):
            f = oracle(shape, root_255)
            rounds_one.append(len(search(f, clean_train_loss=clean).trials))
            sampler = BisectionSampler(R0, LOW, HIGH, clean_train_loss=clean)
            study = make_study(sampler)
            rounds = 0
            while sampler.stop_reason(study) is None:
                first, second = study.ask(), study.ask()  # both RUNNING before either runs
                eps = [_suggest(second), _suggest(first)]  # suggest order must not matter
                assert abs(eps[0] - eps[1]) > 0.005 * max(eps)
                held = [t.params["eps"] for t in study.trials if t.number < first.number]
                assert all(abs(e - h) > 0.005 * h for e in eps for h in held)
                study.tell(first, f(eps[1]))
                study.tell(second, f(eps[0]))
                rounds += 1
            rounds_two.append(rounds)
            assert estimate_from_study(study).epsstar == pytest.approx(root_255 / 255, rel=0.02)
    assert sum(rounds_two) < sum(rounds_one)
    assert max(rounds_two) <= 5


def test_eps_is_visible_to_other_workers_as_soon_as_a_trial_starts() -> None:
    study = make_study(BisectionSampler(R0, LOW, HIGH))
    first = study.ask()  # no suggest_float yet
    assert first.number == 0
    running = study.get_trials(deepcopy=False)[0]
    assert running.params == {}
    assert LOW <= running.system_attrs[EPS_ATTR] <= HIGH
    assert _suggest(first) == running.system_attrs[EPS_ATTR]


def test_simultaneous_plans_are_resolved_at_suggest_time() -> None:
    # two workers that planned at the same instant got the same ε: the later trial plans again
    study = make_study(BisectionSampler(R0, LOW, HIGH))
    first, second = study.ask(), study.ask()
    eps_first = study.get_trials(deepcopy=False)[0].system_attrs[EPS_ATTR]
    study._storage.set_trial_system_attr(second._trial_id, EPS_ATTR, eps_first)
    assert _suggest(first) == eps_first
    assert abs(_suggest(second) - eps_first) > 0.005 * eps_first


def test_a_trial_already_running_keeps_its_eps_against_an_earlier_one() -> None:
    # the earlier trial stored its ε only after the later one had started running with it
    study = make_study(BisectionSampler(R0, LOW, HIGH))
    first, second = study.ask(), study.ask()
    eps_second = _suggest(second)
    study._storage.set_trial_system_attr(first._trial_id, EPS_ATTR, eps_second)
    assert abs(_suggest(first) - eps_second) > 0.005 * eps_second
    assert study.trials[1].params["eps"] == eps_second


def test_threads_sharing_a_study_get_distinct_eps() -> None:
    f = oracle("convex", 3.3)
    study = make_study(BisectionSampler(R0, LOW, HIGH, clean_train_loss=CLEAN))

    def objective(trial: optuna.Trial) -> float:
        eps = _suggest(trial)
        time.sleep(0.01)  # let the other thread start its trial meanwhile
        return f(eps)

    study.optimize(objective, n_trials=20, n_jobs=2)
    eps = sorted(t.params["eps"] for t in study.trials)
    assert all(b - a > 0.005 * b for a, b in zip(eps, eps[1:], strict=False))
    assert estimate_from_study(study).epsstar == pytest.approx(3.3 / 255, rel=0.02)


def test_racing_trials_wait_for_an_earlier_eps_and_do_not_share_it(monkeypatch) -> None:
    # trial 0 stores its ε late and trial 1 sets its parameter late, so without waiting both
    # would check for a duplicate before either could see the other, and both run one ε
    study = make_study(BisectionSampler(R0, LOW, HIGH, clean_train_loss=CLEAN))
    storage = study._storage
    store, set_param = storage.set_trial_system_attr, storage.set_trial_param

    def slow_store(trial_id: int, key: str, value) -> None:
        if key == EPS_ATTR and storage.get_trial_number_from_id(trial_id) == 0:
            time.sleep(0.3)
        store(trial_id, key, value)

    def slow_param(trial_id: int, *args) -> None:
        if storage.get_trial_number_from_id(trial_id) == 1:
            time.sleep(0.6)
        set_param(trial_id, *args)

    monkeypatch.setattr(storage, "set_trial_system_attr", slow_store)
    monkeypatch.setattr(storage, "set_trial_param", slow_param)
    eps: dict[int, float] = {}

    def worker() -> None:
        trial = study.ask()
        eps[trial.number] = _suggest(trial)

    first = threading.Thread(target=worker)
    first.start()
    while not study.get_trials(deepcopy=False):  # trial 0 exists, its ε not stored yet
        time.sleep(0.005)
    second = threading.Thread(target=worker)
    second.start()
    first.join()
    second.join()
    assert sorted(eps) == [0, 1]
    assert abs(eps[0] - eps[1]) > 0.005 * max(eps.values())


def test_second_worker_of_round_one_goes_where_the_search_would_go_next() -> None:
    # nothing predicts the first run yet: the second brackets every ε* up to 8x the start
    study = make_study(BisectionSampler(R0, LOW, HIGH, clean_train_loss=CLEAN))
    first, second = study.ask(), study.ask()
    assert _suggest(second) == pytest.approx(8 * _suggest(first))


def test_pending_run_in_a_bracket_is_split_around_not_hedged_next_to() -> None:
    f = oracle("convex", 8.0)
    study = make_study(BisectionSampler(R0, LOW, HIGH, clean_train_loss=CLEAN))
    for e in (2.53 / 255, 20.2 / 255):  # round one: a bracket [2.53, 20.2]/255 around ε*
        study.enqueue_trial({"eps": e})
        study.optimize(objective_for(f), n_trials=1)
    pending = _suggest(study.ask())
    new = _suggest(study.ask())
    assert 2.53 / 255 < new < 20.2 / 255
    # farther than a hedge (0.4·rtol) or a closing run (0.9·rtol) next to the pending run
    assert abs(math.log(new / pending)) > 0.1


def test_enqueued_eps_is_run_and_planned_around() -> None:
    study = make_study(BisectionSampler(R0, LOW, HIGH, clean_train_loss=CLEAN))
    study.enqueue_trial({"eps": 2 / 255})
    first, second = study.ask(), study.ask()
    assert _suggest(first) == pytest.approx(2 / 255)
    assert abs(_suggest(second) - 2 / 255) > 0.005 * 2 / 255


def test_fresh_sampler_on_the_same_storage_continues_the_search() -> None:
    f = oracle("convex", 8.0)
    uninterrupted = [t.params["eps"] for t in search(f).trials]
    storage = optuna.storages.InMemoryStorage()
    first = make_study(BisectionSampler(R0, LOW, HIGH), storage=storage, study_name="s")
    first.optimize(objective_for(f), n_trials=2)  # the driver "crashes" after two runs
    again = BisectionSampler(R0, LOW, HIGH)
    resumed = make_study(again, storage=storage, study_name="s", load_if_exists=True)
    resumed.optimize(objective_for(f), n_trials=30)
    assert [t.params["eps"] for t in resumed.trials] == pytest.approx(uninterrupted)
    assert again.stop_reason(resumed) == "converged"


def test_crashed_running_trial_does_not_block_the_search_once_failed() -> None:
    f = oracle("linear", 3.3)
    study = make_study(BisectionSampler(R0, LOW, HIGH))
    orphan = study.ask()
    orphan_eps = _suggest(orphan)  # its worker dies: the trial stays RUNNING ...
    study.tell(orphan, state=optuna.trial.TrialState.FAIL)  # ... until it is reaped
    study.optimize(objective_for(f), n_trials=30)
    assert study.trials[1].params["eps"] == pytest.approx(orphan_eps)  # re-run, not skipped
    assert estimate_from_study(study).epsstar == pytest.approx(3.3 / 255, rel=0.02)


# ------------------------------------------------------------------ guesses


def test_lower_guess_keeps_runs_above_it_and_saves_runs() -> None:
    root_255 = 13.0
    f = oracle("concave", root_255)
    plain = search(f, clean_train_loss=CLEAN)
    guided = search(f, clean_train_loss=CLEAN, lower_guess=4 / 255)
    assert all(t.params["eps"] >= 4 / 255 for t in guided.trials)
    assert guided.trials[0].params["eps"] == pytest.approx(16 / 255)  # lower_guess × 4
    assert len(guided.trials) < len(plain.trials)
    assert estimate_from_study(guided).epsstar == pytest.approx(root_255 / 255, rel=0.02)


def test_wrong_lower_guess_is_overruled_by_the_runs() -> None:
    study = search(oracle("linear", 1.0), lower_guess=2 / 255)
    assert estimate_from_study(study).epsstar == pytest.approx(1.0 / 255, rel=0.02)


def test_initial_guess_is_the_first_run_and_a_good_one_saves_runs() -> None:
    plain, guided = [], []
    for shape in SHAPES:
        for root_255 in (0.8, 3.3, 30.0):
            f, guess = oracle(shape, root_255), 0.9 * root_255 / 255  # 10% off ε*
            plain.append(len(search(f, clean_train_loss=CLEAN).trials))
            study = search(f, clean_train_loss=CLEAN, initial_guess=guess)
            assert study.trials[0].params["eps"] == pytest.approx(guess)
            assert estimate_from_study(study).epsstar == pytest.approx(root_255 / 255, rel=0.02)
            guided.append(len(study.trials))
    assert max(guided) <= 4
    assert sum(guided) < sum(plain)


# ------------------------------------------------------------------ settings and validation


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"threshold": math.nan}, "threshold must be a finite"),
        ({"threshold": math.inf}, "threshold must be a finite"),
        ({"eps_low": 0.0}, "eps_low"),
        ({"eps_low": -1 / 255}, "eps_low"),
        ({"eps_low": HIGH}, "eps_low < eps_high"),
        ({"eps_low": 2 * HIGH}, "eps_low < eps_high"),
        ({"rtol": 0.0}, "rtol"),
        ({"rtol": -0.1}, "rtol"),
        ({"rtol": math.nan}, "rtol"),
        ({"clean_train_loss": math.nan}, "clean_train_loss"),
        ({"lower_guess": 100 / 255}, "outside the search range"),
        ({"initial_guess": 0.0}, "initial_guess"),
        ({"max_trials": 0}, "max_trials"),
        ({"max_trials": 2.5}, "max_trials"),
        ({"param_name": ""}, "param_name"),
    ],
)
def test_invalid_settings_raise_config_error(kwargs: dict, message: str) -> None:
    args = {"threshold": R0, "eps_low": LOW, "eps_high": HIGH, **kwargs}
    with pytest.raises(ConfigError, match=message) as info:
        BisectionSampler(**args)
    assert "\n" not in str(info.value)


def test_check_study_records_settings_and_refuses_another_threshold() -> None:
    storage = optuna.storages.InMemoryStorage()
    first = BisectionSampler(R0, LOW, HIGH, clean_train_loss=CLEAN)
    study = make_study(first, storage=storage, study_name="s")
    assert study_settings(study) == first.describe()
    assert study_settings(study)["threshold"] == R0
    other = BisectionSampler(0.5, LOW, HIGH)
    with pytest.raises(ConfigError, match="threshold=0.44, not 0.5"):
        other.check_study(optuna.load_study(study_name="s", storage=storage, sampler=other))
    looser = BisectionSampler(R0, LOW, HIGH, rtol=0.1, clean_train_loss=CLEAN)
    looser.check_study(study)  # rtol is not part of a search's identity: updated
    assert study_settings(study)["rtol"] == 0.1


def test_ensure_compatible_compares_extra_keys_already_recorded() -> None:
    study = optuna.create_study(study_name="s")
    ensure_compatible(study, R0, norm="linf")  # fresh study: nothing to compare
    study.set_user_attr("threshold", R0)
    study.set_user_attr("norm", "linf")
    ensure_compatible(study, R0 * (1 + 1e-12), norm="linf")  # a JSON round trip
    with pytest.raises(ConfigError, match="norm='linf', not 'l2'"):
        ensure_compatible(study, R0, norm="l2")


def test_estimate_from_study_needs_a_threshold_and_a_completed_trial() -> None:
    bare = optuna.create_study()
    with pytest.raises(ConfigError, match="records no threshold"):
        estimate_from_study(bare)
    with pytest.raises(ConfigError, match="no completed trial"):
        estimate_from_study(bare, threshold=R0)
    # with the clean point but no run yet, the clean point alone bounds ε* from below by 0
    est = estimate_from_study(bare, threshold=R0, clean_train_loss=CLEAN)
    assert (est.bound, est.lower, est.upper) == ("above", 0.0, math.inf)


def test_estimate_from_study_uses_the_recorded_param_name_and_clean_loss() -> None:
    sampler = BisectionSampler(R0, LOW, HIGH, clean_train_loss=CLEAN, param_name="epsilon")
    study = make_study(sampler)
    f = oracle("linear", 3.3)
    study.optimize(lambda t: f(t.suggest_float("epsilon", LOW, HIGH)), n_trials=30)
    est = estimate_from_study(study)
    assert est.epsstar == pytest.approx(3.3 / 255, rel=1e-6)
    assert est.threshold == R0


def test_other_parameters_are_drawn_at_random() -> None:
    study = make_study(BisectionSampler(R0, LOW, HIGH, seed=3))
    f = oracle("linear", 3.3)
    study.optimize(lambda t: f(_suggest(t)) + 0 * t.suggest_int("seed", 0, 10**6), n_trials=30)
    assert len({t.params["seed"] for t in study.trials}) == len(study.trials)


def test_multi_objective_study_is_refused() -> None:
    study = optuna.create_study(
        directions=["minimize", "minimize"], sampler=BisectionSampler(R0, LOW, HIGH)
    )
    with pytest.raises(ConfigError, match="single-objective"):
        study.ask()


def test_docstring_examples_run() -> None:
    result = doctest.testmod(sampler_module)
    assert result.attempted >= 2
    assert result.failed == 0
