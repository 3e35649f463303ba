"""Algorithm A.1 (``epsstar finetune``): the parent run and its children, the logged estimate
against a recomputation from the children, reuse on a rerun, and every bad input."""

from __future__ import annotations

import json
import math

import click
import mlflow
import pytest
from _store import _empty_store, runs_with_status, store_in  # noqa: F401
from click.testing import CliRunner

from epsstar import finetune as finetune_module
from epsstar.cli import finetune as finetune_cli
from epsstar.cli._common import EPS_LIST, EpsstarGroup
from epsstar.config import ConfigError, TrainConfig
from epsstar.estimate import extrapolate_epsstar
from epsstar.finetune import ROLE, FinetuneConfig, finetune_epsstar

# A clean run that has converged enough for fine-tunes to raise the loss (6 epochs, batch 128);
# ε large enough for digits that the line crosses R*(0) (a proper estimate, not a bound).
CFG = TrainConfig(dataset="digits", arch="mlp", width=32, epochs=6, steps=3, batch_size=128, lr=0.1,
                  device="cpu")
EPS = (2 / 255, 4 / 255, 8 / 255)
FT = FinetuneConfig(eps_list=EPS, epochs_fraction=1 / 3, compare_scratch=True)  # 2 epochs each
CLI_ARGS = ["finetune", "--width", "32", "--epochs", "6", "--steps", "3", "--batch-size", "128",
            "--lr", "0.1",
            "--device", "cpu", "--eps-list", "2/255,4/255,8/255", "--epochs-fraction",
            str(1 / 3), "--compare-scratch", "true", "--log-model", "false"]


@click.group(cls=EpsstarGroup)
def cli() -> None:
    """The error policy of the real ``epsstar`` group, with this command alone."""


cli.add_command(finetune_cli.command)


# --------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def store(tmp_path_factory, _empty_store):  # noqa: F811 - pytest fixture injection
    """One sqlite store for the module: the fine-tunes are trained once and read by each test."""
    tmp = tmp_path_factory.mktemp("finetune")
    with pytest.MonkeyPatch.context() as mp, store_in(tmp, _empty_store, mp):
        yield tmp


@pytest.fixture(scope="module")
def result(store):
    """No clean run exists yet: it is trained first, as a child of the parent."""
    return finetune_epsstar(CFG, FT, log_model=False)


def _client() -> mlflow.MlflowClient:
    return mlflow.MlflowClient()


def _all_runs() -> list:
    client = _client()
    exps = [e.experiment_id for e in client.search_experiments()]
    return client.search_runs(exps, max_results=1000)


def _children(parent_id: str, role: str) -> list:
    return [r for r in _all_runs() if r.data.tags.get("mlflow.parentRunId") == parent_id
            and r.data.tags.get("epsstar.role") == role]


def _assert_nothing_created_or_running(before: int) -> None:
    assert len(_all_runs()) == before
    assert not runs_with_status("RUNNING")


# --------------------------------------------------------------------------- FinetuneConfig
def test_config_defaults_follow_the_paper():
    ft = FinetuneConfig()
    assert [e * 255 for e in ft.eps_list] == pytest.approx([0.25, 0.5, 1.0])
    assert ft.one_point * 255 == pytest.approx(0.5)
    assert ft.finetune_epochs(200) == 40


def test_config_sorts_eps_and_picks_the_middle_or_the_asked_one_point():
    ft = FinetuneConfig(eps_list=(4 / 255, 1 / 255, 2 / 255, 8 / 255))
    assert ft.eps_list == (1 / 255, 2 / 255, 4 / 255, 8 / 255)
    assert ft.one_point == 2 / 255  # lower middle of an even count
    assert FinetuneConfig(eps_list=EPS, one_point_eps=8 / 255).one_point == 8 / 255


def test_finetune_epochs_fraction_floor_and_override():
    assert FinetuneConfig(epochs_fraction=0.2).finetune_epochs(30) == 6
    assert FinetuneConfig(epochs_fraction=0.01).finetune_epochs(30) == 1  # at least one
    assert FinetuneConfig(epochs=4).finetune_epochs(30) == 4


@pytest.mark.parametrize("kwargs, message", [
    ({"eps_list": ()}, "at least one"),
    ({"eps_list": (0.0, 1 / 255)}, "must be > 0"),
    ({"eps_list": (-1 / 255,)}, "must be > 0"),
    ({"eps_list": (math.nan,)}, "must be > 0"),
    ({"eps_list": (1 / 255, 1 / 255)}, "duplicates"),
    ({"one_point_eps": 3 / 255}, "not in the fine-tune eps list"),
    ({"epochs_fraction": 0.0}, "epochs_fraction"),
    ({"epochs_fraction": 1.5}, "epochs_fraction"),
    ({"epochs": -1}, "epochs"),
    ({"attack": "cw"}, "unknown attack"),
])
def test_config_rejects_bad_values(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        FinetuneConfig(**kwargs)


def test_cli_defaults_agree_with_the_config():
    ft, defaults = FinetuneConfig(), finetune_cli._DEFAULTS
    assert EPS_LIST.convert(defaults["eps_list"], None, None) == ft.eps_list
    assert (defaults["attack"], defaults["epochs_fraction"], defaults["epochs"]) == (
        ft.attack, ft.epochs_fraction, ft.epochs)


# --------------------------------------------------------------------------- the workflow
def test_parent_holds_the_estimate_recomputed_from_the_children(result):
    parent = _client().get_run(result.parent_run_id)
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["epsstar.role"] == ROLE
    m = parent.data.metrics
    (clean,) = _children(result.parent_run_id, "clean")
    children = _children(result.parent_run_id, "finetune")
    assert clean.info.run_id == result.clean_run_id == parent.data.tags["epsstar.clean_run"]
    assert m["threshold"] == clean.data.metrics["best_test_clean_loss"]
    assert m["clean_train_loss"] == clean.data.metrics["best_train_adv_loss"]
    assert m["clean_seconds"] == clean.data.metrics["train_seconds"]

    eps = [float(c.data.params["eps"]) for c in children]
    losses = [c.data.metrics["best_train_adv_loss"] for c in children]
    assert sorted(eps) == pytest.approx(EPS)
    expected = extrapolate_epsstar(eps, losses, m["clean_train_loss"], m["threshold"])
    assert expected.bound is None  # a real crossing, so the comparison below means something
    assert m["epsstar_ft"] == pytest.approx(expected.epsstar, rel=1e-9)
    assert m["epsstar_ft_255"] == pytest.approx(expected.epsstar * 255, rel=1e-9)
    (one,) = [c for c in children if float(c.data.params["eps"]) == pytest.approx(4 / 255)]
    expected_1pt = extrapolate_epsstar([4 / 255], [one.data.metrics["best_train_adv_loss"]],
                                       m["clean_train_loss"], m["threshold"])
    assert m["epsstar_ft_1pt"] == pytest.approx(expected_1pt.epsstar, rel=1e-9)
    assert m["epsstar_ft_1pt_255"] == pytest.approx(expected_1pt.epsstar * 255, rel=1e-9)
    assert m["finetune_seconds"] == pytest.approx(
        sum(c.data.metrics["train_seconds"] for c in children))


def test_children_are_triangular_finetunes_of_the_clean_run(result):
    children = _children(result.parent_run_id, "finetune")
    assert len(children) == len(EPS)
    client = _client()
    for child in children:
        p = child.data.params
        assert child.info.status == "FINISHED"
        assert p["init"] == f"runs:/{result.clean_run_id}"
        assert (p["schedule"], p["attack"], p["epochs"]) == ("triangular", "pgd", "2")
        assert float(p["lr"]) == CFG.lr  # the peak is the clean run's base lr
        lr = [h.value for h in sorted(client.get_metric_history(child.info.run_id, "lr"),
                                      key=lambda h: h.step)]
        assert lr[0] < lr[1] <= CFG.lr  # rises from (near) zero


def test_compare_scratch_times_one_full_run_at_the_one_point_eps(result):
    (scratch,) = _children(result.parent_run_id, "scratch")
    p = scratch.data.params
    assert float(p["eps"]) == pytest.approx(4 / 255)
    assert (p["init"], p["epochs"], p["schedule"]) == ("scratch", "6", CFG.schedule)
    m = _client().get_run(result.parent_run_id).data.metrics
    seconds = scratch.data.metrics["train_seconds"]
    assert m["scratch_seconds"] == seconds
    mean_ft = m["finetune_seconds"] / len(EPS)
    assert m["time_saved_fraction"] == pytest.approx(1 - mean_ft / seconds)
    assert 0 < m["time_saved_fraction"] < 1


def test_report_artifacts_list_every_finetune(result, tmp_path):
    client = _client()
    names = {f.path for f in client.list_artifacts(result.parent_run_id, "report")}
    assert {"report/finetune.json", "report/finetune.md",
            "report/finetune_loss_vs_eps.png"} <= names
    path = client.download_artifacts(result.parent_run_id, "report/finetune.json", tmp_path)
    table = json.loads(open(path).read())
    ids = {c.info.run_id for c in _children(result.parent_run_id, "finetune")}
    assert {row["run_id"] for row in table["rows"]} == ids
    assert table["estimate"]["epsstar"] == pytest.approx(result.estimate.epsstar)


def test_rerun_trains_nothing_and_reports_into_the_same_parent(result):
    before = len(_all_runs())
    for extra in ([], ["--clean-run", result.clean_run_id]):
        out = CliRunner().invoke(cli, CLI_ARGS + extra)
        assert out.exit_code == 0, out.output
        assert out.stderr.count("(reused)") == len(EPS) + 1  # fine-tunes and the scratch run
        (line,) = out.stdout.strip().splitlines()
        assert f"{result.estimate.epsstar * 255:.3g}/255" in line
        assert result.parent_run_id in line
    assert len(_all_runs()) == before
    assert not runs_with_status("RUNNING")


def test_an_interrupted_finetune_ends_the_parent_killed(result, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(finetune_module, "run_training", interrupted)
    with pytest.raises(KeyboardInterrupt):  # another eps list: a new parent, not the fixture's
        finetune_epsstar(CFG, FinetuneConfig(eps_list=(1 / 255,)), log_model=False)
    (killed,) = runs_with_status("KILLED")
    assert killed.data.tags["epsstar.role"] == ROLE
    assert not runs_with_status("RUNNING")


# --------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("changes, message", [
    ({"arch": "cnn"}, "arch=mlp"),
    ({"dataset": "mnist"}, "dataset=digits"),
    ({"width": 16}, "width=32"),
])
def test_a_clean_run_of_other_data_or_model_is_refused(result, changes, message):
    before = len(_all_runs())
    ft = FinetuneConfig(eps_list=EPS, clean_run_id=result.clean_run_id)
    with pytest.raises(ConfigError, match=message):
        finetune_epsstar(CFG.replace(**changes), ft, log_model=False)
    _assert_nothing_created_or_running(before)


def test_a_run_that_is_not_clean_is_refused(result):
    before = len(_all_runs())
    child = _children(result.parent_run_id, "finetune")[0].info.run_id
    with pytest.raises(ConfigError, match="not a clean run"):
        finetune_epsstar(CFG, FinetuneConfig(eps_list=EPS, clean_run_id=child))
    _assert_nothing_created_or_running(before)


@pytest.mark.parametrize("args, message", [
    (["--clean-run", "0123456789abcdef0123456789abcdef"], "no run"),
    (["--eps-list", "0,1/255"], "must be > 0"),
    (["--eps-list", ""], "at least one"),
    (["--one-point-eps", "3/255"], "not in the fine-tune eps list"),
    (["--init", "checkpoints/best.pt"], "clean run trained from scratch"),
])
def test_bad_input_exits_2_with_one_line_and_no_run(result, args, message):
    before = len(_all_runs())
    out = CliRunner().invoke(cli, CLI_ARGS + args)
    assert out.exit_code == 2
    (line,) = out.stderr.strip().splitlines()
    assert line.startswith("Error: ") and message in line
    _assert_nothing_created_or_running(before)


def test_a_negative_eps_is_a_usage_error(result):
    before = len(_all_runs())
    out = CliRunner().invoke(cli, CLI_ARGS + ["--eps-list", "1/255,-1/255"])
    assert out.exit_code == 2
    assert "Invalid value for '--eps-list'" in out.stderr
    _assert_nothing_created_or_running(before)
