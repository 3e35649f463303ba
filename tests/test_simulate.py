"""`epsstar simulate`: ε* of the linear model by the Optuna search, MLflow runs, bad input."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import mlflow
import numpy as np
import pytest
from click.testing import CliRunner
from scipy import optimize

from epsstar import simulate
from epsstar.cli.simulate import command
from epsstar.config import ConfigError
from epsstar.linear import adv_train_loss, default_lr
from epsstar.simulate import SimulateConfig

SMALL = SimulateConfig(d=(2, 3), n=(40,), reps=30, n_eps=5, steps=60)
SMALL_ARGS = ["--d", "2,3", "--n", "40", "--reps", "30", "--n-eps", "5", "--steps", "60"]


# ------------------------------------------------------------------------- ε* of the linear model
def test_epsstar_is_a_constant_factor_of_sqrt_d_over_n() -> None:
    """n = 100, 300 data sets, L2, σ = 1, seed 0.

    Measured ε*/√(d/n) = 0.075 (d=2), 0.24 (d=5), 0.37 (d=10): inside [0.05, 0.6] for all d,
    i.e. within a factor of about 5 of each other. The ratio grows with d because the crossing of
    the SPEC's threshold scales like σ·d/n here (the adversarial loss grows by ≈ 2ε·σ·√(2/π) and
    must cover the generalisation gap ≈ 2σ²·d/n); the θ p-value's collapse is what sits at
    ε ≈ √(d/n) (test_linear.py).
    """
    cfg = SimulateConfig(d=(2, 5, 10), n_eps=3)
    ratios = []
    for d in cfg.d:
        result = simulate.simulate_setting(cfg, d, 100)
        assert result.estimate.bound is None
        ratios.append(result.estimate.epsstar / result.scale)
    assert all(0.05 < r < 0.6 for r in ratios), ratios


def test_search_brackets_the_true_crossing() -> None:
    cfg = SimulateConfig(d=(5,), n_eps=3, rtol=0.02)
    result = simulate.simulate_setting(cfg, 5, 100)
    problem, lr, c = simulate.sample(cfg, 5, 100), default_lr(5, 100), result.curves
    root = optimize.brentq(
        lambda e: adv_train_loss(e, problem, "l2", lr=lr, steps=cfg.steps) - c.threshold,
        c.eps[0], c.eps[-1], xtol=1e-6)
    e = result.estimate
    assert e.lower <= root <= e.upper
    assert (e.upper - e.lower) / e.upper <= cfg.rtol
    assert 2 <= result.n_trials < simulate.MAX_TRIALS


def test_no_generalisation_gap_is_a_bound_not_a_crash() -> None:
    """A clean run whose training loss is not below R*(0) gives ε* < every ε (SPEC §3)."""
    cfg = SimulateConfig(d=(2,), n=(40,), reps=30, n_eps=3, steps=60)
    problem = simulate.sample(cfg, 2, 40)
    curves = simulate.simulate_setting(cfg, 2, 40).curves
    no_gap = dataclasses.replace(curves, clean_train_loss=curves.threshold + 0.01)
    estimate, n_trials = simulate.search_epsstar(problem, no_gap, "l2", lr=default_lr(2, 40),
                                                 steps=cfg.steps, rtol=cfg.rtol)
    assert (estimate.bound, estimate.upper, n_trials) == ("below", 0.0, 0)


# ------------------------------------------------------------------------- tracking
@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("mlflow")  # one database for the module: creating it is slow


@pytest.fixture
def client(store: Path, monkeypatch: pytest.MonkeyPatch,
           request: pytest.FixtureRequest) -> mlflow.MlflowClient:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{store}/mlflow.db")
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", request.node.name)  # one experiment per test
    for name in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(store)  # the artifact store (./mlruns) stays in the temporary directory
    return mlflow.MlflowClient()


def _runs(client: mlflow.MlflowClient, experiment: str) -> list:
    exp = client.get_experiment_by_name(experiment)
    return client.search_runs([exp.experiment_id])


def _artifacts(client: mlflow.MlflowClient, run_id: str, path: str = "") -> set[str]:
    return {a.path for a in client.list_artifacts(run_id, path)}


def test_command_end_to_end(client: mlflow.MlflowClient, request: pytest.FixtureRequest) -> None:
    result = CliRunner().invoke(command, SMALL_ARGS)
    assert result.exit_code == 0, result.output
    table = result.output.strip().splitlines()
    assert table[0].split() == ["d", "n", "sqrt(d/n)", "eps*", "ratio", "trials"]
    assert [row.split()[:2] for row in table[1:]] == [["2", "40"], ["3", "40"]]

    runs = _runs(client, request.node.name)
    assert {r.info.status for r in runs} == {"FINISHED"}
    assert {r.data.tags["epsstar.role"] for r in runs} == {"simulate"}
    (parent,) = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = sorted((r for r in runs if r is not parent), key=lambda r: int(r.data.params["d"]))
    assert [r.data.params["d"] for r in children] == ["2", "3"]
    assert {r.data.tags["mlflow.parentRunId"] for r in children} == {parent.info.run_id}
    assert parent.data.params["d"] == "2,3"
    assert _artifacts(client, parent.info.run_id) >= {"figures", "simulate.csv"}
    assert _artifacts(client, parent.info.run_id, "figures") == {"figures/simulate.png"}
    for child, d in zip(children, (2, 3), strict=True):
        m = child.data.metrics
        assert {"n", "norm", "reps", "sigma", "seed"} <= set(child.data.params)
        assert m["sqrt_d_over_n"] == pytest.approx(math.sqrt(d / 40))
        assert m["epsstar_ratio"] == pytest.approx(m["epsstar"] / m["sqrt_d_over_n"])
        assert m["n_trials"] >= 1
        history = client.get_metric_history(child.info.run_id, "pvalue_theta")
        assert sorted(h.step for h in history) == list(range(5))
        ratios = [h.value for h in sorted(
            client.get_metric_history(child.info.run_id, "log_eps_ratio"), key=lambda h: h.step)]
        np.testing.assert_allclose(ratios, np.linspace(-2, 2, 5), atol=1e-9)
        assert _artifacts(client, child.info.run_id, "figures") == {
            "figures/phase_transition.png"}


def test_children_nest_under_the_mlflow_run_run(
    client: mlflow.MlflowClient, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest
) -> None:
    """Under `mlflow run` the entry point's run is the parent; its own params are kept."""
    exp_id = client.create_experiment(request.node.name)
    outer = client.create_run(exp_id).info.run_id
    client.log_param(outer, "d", "3 ")  # as `mlflow run -P d="3 "` would have logged it
    monkeypatch.setenv("MLFLOW_RUN_ID", outer)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_ID", exp_id)
    simulate.run(SimulateConfig(d=(3,), n=(40,), reps=30, n_eps=3, steps=60))
    runs = _runs(client, request.node.name)
    assert len(runs) == 2 and {r.info.status for r in runs} == {"FINISHED"}
    (child,) = [r for r in runs if r.info.run_id != outer]
    assert child.data.tags["mlflow.parentRunId"] == outer
    params = client.get_run(outer).data.params
    assert params["d"] == "3 " and params["reps"] == "30"


def test_an_escaping_error_fails_the_runs(
    client: mlflow.MlflowClient, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest
) -> None:
    real = simulate.simulate_setting

    def broken(cfg: SimulateConfig, d: int, n: int) -> simulate.SettingResult:
        if d == 3:
            raise RuntimeError("boom")
        return real(cfg, d, n)

    monkeypatch.setattr(simulate, "simulate_setting", broken)
    with pytest.raises(RuntimeError, match="boom"):
        simulate.run(SMALL)
    status = {r.data.params.get("d"): r.info.status for r in _runs(client, request.node.name)}
    assert status == {"2": "FINISHED", "3": "FAILED", "2,3": "FAILED"}


# ------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("changes", [
    {"d": (0,)}, {"d": ()}, {"n": (-5,)}, {"reps": 1}, {"reps": 11, "d": (10,)},
    {"n_eps": 1}, {"sigma": 0.0}, {"sigma": math.nan}, {"rtol": 1.0}, {"steps": 0},
    {"norm": "l1"},
])
def test_bad_config_is_a_config_error(changes: dict) -> None:
    with pytest.raises(ConfigError):
        SimulateConfig(**changes)


def test_every_config_field_is_an_option_with_its_default() -> None:
    options = {p.name: p.default for p in command.params if p.name != "figure"}
    assert options == SimulateConfig().to_params()


@pytest.mark.parametrize("args", [["--d", "0"], ["--d", "2,x"], ["--reps", "1"],
                                  ["--n", ""], ["--n-eps", "1"]])
def test_bad_command_line_is_a_config_error(args: list[str]) -> None:
    result = CliRunner().invoke(command, args)
    assert isinstance(result.exception, ConfigError), result.output
