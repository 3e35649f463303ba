"""``epsstar report`` on synthetic tracking stores built directly with MlflowClient (the paper's
published numbers as runs), plus one end-to-end run on digits."""

from __future__ import annotations

import csv
import math
import re
import time
from pathlib import Path

import click
import mlflow
import pytest
from _store import TINY, _empty_store, tracking_store  # noqa: F401 - pytest fixtures
from click.testing import CliRunner
from mlflow.entities import Metric, Param

from epsstar import tracking
from epsstar.cli._common import EpsstarGroup
from epsstar.cli.report import command as report_command
from epsstar.config import ConfigError, EpsstarError, TrainConfig
from epsstar.estimate import extrapolate_epsstar, interpolate_epsstar
from epsstar.report import Curve, ReportConfig, make_report

BASE = dict(dataset="digits", arch="mlp", width=16, epochs=4)
# CIFAR-10, n = 10,000 (paper/cifar10_scratch.csv): eps_255 → (train loss, train acc, test
# loss, test acc) at the best epoch; the eps = 0 row is the clean run (its test loss is R*(0)).
PAPER_SCRATCH = {0: (0.0403, 0.9894, 0.441, 0.8717), 1: (0.1586, 0.9462, 0.879, 0.734),
                 2: (0.2199, 0.9269, 1.1723, 0.6555), 8: (1.2186, 0.5114, 1.7621, 0.3723)}
# paper/cifar10_finetune.csv: attack → {eps_255: adversarial training loss at the best epoch}
PAPER_FINETUNE = {"pgd": {0.25: 0.0426, 0.5: 0.0829, 1: 0.2008},
                  "fgm": {0.25: 0.0893, 0.5: 0.1562, 1: 0.2289}}


# --------------------------------------------------------------------------- building stores
def best(train_loss: float, train_acc: float, test_loss: float, test_acc: float,
         epoch: int = 3) -> dict[str, float]:
    """The final metrics of a run whose best epoch had these numbers."""
    return {"best_epoch": epoch, "best_train_adv_loss": train_loss, "best_train_adv_acc": train_acc,
            "best_test_adv_loss": test_loss, "best_test_adv_acc": test_acc,
            "best_test_clean_loss": test_loss, "best_test_clean_acc": test_acc}


def log_run(client: mlflow.MlflowClient, experiment_id: str, metrics: dict[str, float], *,
            eps_255: float = 0.0, history: dict[str, list[float]] | None = None,
            tags: dict[str, str] | None = None, status: str = "FINISHED", **changes) -> str:
    """A run with the tracking contract's params, tags and metrics, as run_training leaves it.
    ``history``: per-epoch values (epoch 1, 2, ...) of per-epoch metrics."""
    cfg = TrainConfig(**{**BASE, **changes, "eps": eps_255 / 255})
    run = client.create_run(experiment_id, run_name=tracking.default_run_name(cfg), tags={
        tracking.TAG_ROLE: cfg.role, tracking.TAG_HASH: cfg.config_hash(), **(tags or {})})
    now = int(time.time() * 1000)
    values = [Metric(k, float(v), now, 0) for k, v in metrics.items()]
    for name, series in (history or {}).items():
        values += [Metric(name, float(v), now, epoch) for epoch, v in enumerate(series, 1)]
    client.log_batch(run.info.run_id, metrics=values,
                     params=[Param(k, str(v)) for k, v in cfg.to_params().items()])
    client.set_terminated(run.info.run_id, status)
    return run.info.run_id


def log_paper_scratch(client, experiment_id: str, **changes) -> str:
    """The paper's n = 10K from-scratch table as runs; returns the clean run's id."""
    ids = {eps: log_run(client, experiment_id, best(*row), eps_255=eps, **changes)
           for eps, row in PAPER_SCRATCH.items()}
    return ids[0]


@pytest.fixture
def store(tracking_store, tmp_path):  # noqa: F811 - the fixture imported above
    """(client, experiment id) of an empty experiment "paper" in a fresh sqlite store."""
    client = mlflow.MlflowClient()
    return client, client.create_experiment("paper", artifact_location=str(tmp_path / "art"))


def report(tmp_path: Path, **kwargs):
    kwargs.setdefault("n_boot", 200)
    kwargs.setdefault("max_curves", 0)  # figures are the slow part; two tests draw curves
    return make_report(ReportConfig(out=tmp_path / "out", **kwargs))


def only(result):
    assert len(result.groups) == 1, [g.label for g in result.groups]
    return result.groups[0]


# --------------------------------------------------------------------------- estimates
def test_scratch_epsstar_is_the_interpolation_of_the_runs(store, tmp_path):
    client, exp = store
    log_paper_scratch(client, exp)
    g = only(report(tmp_path, log=False))
    rows = PAPER_SCRATCH.items()
    expected = interpolate_epsstar([e / 255 for e, _ in rows], [r[0] for _, r in rows], 0.441)
    assert g.threshold == pytest.approx(0.441)
    assert g.clean_train_loss == pytest.approx(0.0403)
    assert g.scratch.epsstar == pytest.approx(expected.epsstar)
    assert g.scratch.epsstar * 255 == pytest.approx(3.33, abs=0.005)
    assert (g.scratch.lower * 255, g.scratch.upper * 255) == pytest.approx((2, 8))
    assert g.interval is None  # one run per eps: nothing to resample
    md = (tmp_path / "out" / "report.md").read_text()
    assert "3.33/255 [2, 8]" in md
    # Table 1: the eps = 2 row carries that run's numbers
    assert "| scratch | 2 | 1 | 3 | 0.2199 | 0.9269 | 1.1723 | 0.6555 |" in md


def test_seeds_are_averaged_and_bootstrapped(store, tmp_path):
    client, exp = store
    log_run(client, exp, best(0.04, 0.99, 0.441, 0.87))
    losses = {1: (0.15, 0.17), 2: (0.21, 0.23), 8: (1.2, 1.24)}
    for eps, pair in losses.items():
        for seed, loss in enumerate(pair):
            log_run(client, exp, best(loss, 0.9, 1.0, 0.6), eps_255=eps, seed=seed)
    g = only(report(tmp_path, log=False))
    means = [sum(p) / 2 for p in losses.values()]
    expected = interpolate_epsstar([0, 1, 2, 8], [0.04, *means], 0.441)
    assert g.scratch.epsstar * 255 == pytest.approx(expected.epsstar)
    lo, hi = g.interval
    assert lo <= g.scratch.epsstar <= hi and lo < hi
    assert [len(r.runs) for r in g.rows] == [1, 2, 2, 2]


def test_finetune_estimates_reproduce_the_paper(store, tmp_path):
    client, exp = store
    clean = log_run(client, exp, best(0.0403, 0.99, 0.441, 0.87))
    for attack, losses in PAPER_FINETUNE.items():
        for eps, loss in losses.items():
            log_run(client, exp, best(loss, 0.95, 0.5, 0.8), eps_255=eps, attack=attack,
                    init=f"runs:/{clean}", schedule="triangular", epochs=2)
    log_run(client, exp, best(0.3, 0.9, 1.0, 0.6), eps_255=2, norm="l2")  # shares the clean run
    l2, g = report(tmp_path, log=False).groups
    assert l2.group.config["norm"] == "l2" and l2.group.clean == g.group.clean
    assert l2.finetune == () and len(g.group.finetune) == 6  # linf fine-tunes: a linf group
    est = {(f.attack, tuple(round(e * 255, 4) for e in f.eps)): f.estimate.epsstar * 255
           for f in g.finetune}
    assert est[("pgd", (0.25, 0.5, 1.0))] == pytest.approx(2.50, abs=0.005)
    assert est[("pgd", (0.5,))] == pytest.approx(4.70, abs=0.005)
    assert est[("fgm", (0.25, 0.5, 1.0))] == pytest.approx(2.08, abs=0.005)
    assert est[("fgm", (0.5,))] == pytest.approx(1.73, abs=0.005)
    pgd = PAPER_FINETUNE["pgd"]
    assert est[("pgd", (0.25, 0.5, 1.0))] == pytest.approx(
        extrapolate_epsstar(list(pgd), list(pgd.values()), 0.0403, 0.441).epsstar)
    assert g.scratch is None and any("no adversarial from-scratch" in n for n in g.notes)
    assert g.label == "digits · mlp-16 · n=all · linf · at · fine-tuning only"
    md = (tmp_path / "out" / "report.md").read_text()
    assert "eps* from PGD fine-tuning: 2.5/255 (3-point, 90% CI" in md


def test_logged_parent_estimates_are_shown_with_their_group(store, tmp_path):
    client, exp = store
    parent = client.create_run(exp, tags={tracking.TAG_ROLE: "search"}).info.run_id
    client.log_batch(parent, metrics=[Metric("epsstar_255", 3.1, 0, 0)])
    client.set_terminated(parent)
    log_paper_scratch(client, exp)
    log_run(client, exp, best(0.05, 0.9, 0.5, 0.8), eps_255=0, width=32,
            tags={tracking.TAG_PARENT: parent})
    result = report(tmp_path, log=False)
    by_width = {g.group.config["width"]: g for g in result.groups}
    assert [s.run_id for s in by_width[32].group.summaries] == [parent]
    assert by_width[16].group.summaries == []
    assert "epsstar_255=3.1000" in (tmp_path / "out" / "report.md").read_text()


# --------------------------------------------------------------------------- grouping
def test_norms_and_datasets_are_never_mixed(store, tmp_path):
    client, exp = store
    clean = log_paper_scratch(client, exp)  # digits, linf: eps* = 3.33
    for eps, loss in ((1, 0.3), (4, 0.6)):
        log_run(client, exp, best(loss, 0.9, 1.0, 0.6), eps_255=eps, norm="l2")
    log_run(client, exp, best(0.02, 0.99, 0.2, 0.95), dataset="mnist")
    log_run(client, exp, best(0.3, 0.9, 0.5, 0.8), eps_255=16, dataset="mnist")
    groups = report(tmp_path, log=False).groups
    by = {(g.group.config["dataset"], g.group.config["norm"]): g for g in groups}
    assert sorted(by) == [("digits", "l2"), ("digits", "linf"), ("mnist", "linf")]
    assert by["digits", "linf"].scratch.epsstar * 255 == pytest.approx(3.33, abs=0.005)
    # the l2 runs have their own curve; ε = 0 is the one clean run (it has no norm)
    assert [r.run_id for r in by["digits", "l2"].group.clean] == [clean]
    assert by["digits", "l2"].scratch.epsstar * 255 == pytest.approx(1 + 3 * 0.141 / 0.3)
    assert by["mnist", "linf"].threshold == pytest.approx(0.2)
    assert by["mnist", "linf"].scratch.epsstar * 255 == pytest.approx(16 * 0.18 / 0.28)
    for g in groups:
        assert len({(r.cfg.dataset, r.cfg.norm) for r in g.group.scratch}) == 1
        assert {r.cfg.dataset for r in g.group.runs} == {g.group.config["dataset"]}


def test_fgm_catastrophic_overfitting_is_flagged(store, tmp_path):
    client, exp = store
    log_paper_scratch(client, exp)  # the PGD group and its clean run (shared with FGM)
    # eps → (last-epoch FGM train acc, last-epoch PGD test acc)
    last = {4: (0.6, 0.40), 8: (0.55, 0.30), 12: (0.92, 0.01), 16: (0.95, 0.0), 32: (0.1, 0.0)}
    ids = {eps: log_run(client, exp, best(0.3 + eps / 40, 0.6, 1.5, 0.3), eps_255=eps,
                        attack="fgm", history={"train_adv_acc": [0.5, tr],
                                               "test_adv_acc": [0.3, te]})
           for eps, (tr, te) in last.items()}
    groups = [g for g in report(tmp_path, log=False).groups if g.group.config["norm"] == "linf"]
    by = {g.group.config["attack"]: g for g in groups}
    assert by["fgm"].unstable == {ids[12], ids[16]}  # eps 32: training accuracy collapsed too
    assert by["fgm"].unstable_eps * 255 == pytest.approx(12)
    assert by["pgd"].unstable_eps is None
    assert [r.run_id for r in by["fgm"].group.clean] == [r.run_id for r in by["pgd"].group.clean]
    assert by["fgm"].threshold == pytest.approx(0.441)
    md = (tmp_path / "out" / "report.md").read_text()
    assert "FGM catastrophic overfitting (PGD test acc collapsed, train acc high) from eps = " \
           "12/255" in md
    assert "is below the unstable eps 12/255" in md  # eps* of the PGD group: 3.33/255
    rows = {round(r.eps * 255): r.unstable for r in by["fgm"].rows}
    assert rows == {0: 0, 4: 0, 8: 0, 12: 1, 16: 1, 32: 0}


def test_group_without_clean_run_is_reported_with_a_note(store, tmp_path):
    client, exp = store
    log_run(client, exp, best(0.2, 0.9, 1.0, 0.6), eps_255=2)
    g = only(report(tmp_path, log=False))
    assert g.threshold is None and g.scratch is None
    assert any("no clean run" in n for n in g.notes)
    assert "note: no clean run" in (tmp_path / "out" / "report.md").read_text()


def test_study_and_parent_filters(store, tmp_path):
    client, exp = store
    parent = client.create_run(exp, tags={tracking.TAG_ROLE: "search"}).info.run_id
    client.set_terminated(parent)
    clean = log_paper_scratch(client, exp, tags={tracking.TAG_STUDY: "a",
                                                 tracking.TAG_PARENT: parent})
    log_paper_scratch(client, exp, width=32, tags={tracking.TAG_STUDY: "b"})
    assert only(report(tmp_path, log=False, study="a")).group.config["width"] == 16
    assert only(report(tmp_path, log=False, parent=parent)).group.config["width"] == 16
    assert len(report(tmp_path, log=False).groups) == 2
    # a later search of study "c" reused the clean run of study "a": found through its parent
    later = client.create_run(exp, tags={tracking.TAG_ROLE: "search",
                                         tracking.TAG_STUDY: "c"}).info.run_id
    client.log_batch(later, metrics=[Metric("epsstar_255", 3.3, 0, 0)],
                     params=[Param("clean_run_id", clean)])
    client.set_terminated(later)
    log_run(client, exp, best(0.3, 0.9, 1.0, 0.6), eps_255=4, tags={tracking.TAG_STUDY: "c"})
    g = only(report(tmp_path, log=False, study="c"))
    assert [r.run_id for r in g.group.clean] == [clean] and g.threshold == pytest.approx(0.441)


# --------------------------------------------------------------------------- outputs
def test_outputs_are_self_contained_and_logged(store, tmp_path):
    client, exp = store
    clean = log_paper_scratch(client, exp)
    log_run(client, exp, best(0.08, 0.95, 0.5, 0.8), eps_255=0.5, init=f"runs:/{clean}")
    log_run(client, exp, {"best_epoch": 1}, eps_255=4, status="FAILED")  # left out
    n_runs = 5
    out = tmp_path / "out"
    (out / "plots").mkdir(parents=True)
    (out / "plots" / "mine.png").write_bytes(b"")  # the user's: neither logged nor deleted
    result = report(tmp_path)
    assert (out / "plots" / "mine.png").exists()
    page = (out / "report.html").read_text()
    assert page.count('<img alt="') == page.count('src="data:image/png;base64,') >= 1
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", page)
    assert "<link" not in page and "<script" not in page
    with open(out / "runs.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == n_runs and len({r["run_id"] for r in rows}) == n_runs
    assert {r["role"] for r in rows} == {"clean", "scratch", "finetune"}
    assert all(r["group"] == result.groups[0].slug for r in rows)
    run = client.get_run(result.report_run_id)
    assert run.info.status == "FINISHED" and run.info.experiment_id == exp
    assert run.data.tags[tracking.TAG_ROLE] == "report"
    logged = {a.path for a in client.list_artifacts(result.report_run_id)}
    assert logged == {"report.md", "report.html", "runs.csv", "groups.csv", "plots"}
    pngs = {a.path for a in client.list_artifacts(result.report_run_id, "plots")}
    assert pngs == {f"plots/{p.name}" for p in result.files if p.suffix == ".png"} != set()
    # a second report does not read the first report's run back
    assert report(tmp_path, log=False).n_runs == n_runs


def test_learning_curves_are_capped_and_give_the_gap_ratio(store, tmp_path):
    client, exp = store
    history = {"train_adv_loss": [1.0, 0.5, 0.4, 0.2], "test_adv_loss": [1.1, 0.6, 0.6, 0.4],
               "lr": [0.1, 0.1, 0.01, 0.001]}
    ids = [log_run(client, exp, best(*PAPER_SCRATCH[eps]), eps_255=eps, history=history)
           for eps in (0, 1, 2, 8)]
    result = report(tmp_path, log=False, max_curves=2)
    assert len(list((tmp_path / "out" / "plots").glob("*-curve-*.png"))) == 2
    curve = Curve(result.groups[0].group.clean[0], result.groups[0],
                  {k: list(enumerate(v, 1)) for k, v in history.items()})
    assert curve.lr_drop_epoch() == 3
    assert curve.gap_after_drop() == pytest.approx((0.5 + 1.0) / 2)  # epochs 3 and 4
    md = (tmp_path / "out" / "report.md").read_text()
    # the clean run: (0.441 - 0.0403) / 0.0403 at its best epoch, 0.75 after the lr drop
    assert f"| {ids[0]} | clean | 0 | 3 | 9.943 | 0.750 |" in md


def test_logs_into_the_run_mlflow_run_made(store, tmp_path, monkeypatch):
    client, exp = store
    log_paper_scratch(client, exp)
    mine = client.create_run(exp).info.run_id  # RUNNING, as `mlflow run` leaves it for us
    monkeypatch.setenv("MLFLOW_RUN_ID", mine)
    result = report(tmp_path)
    run = client.get_run(mine)
    assert result.report_run_id == mine and run.info.status == "RUNNING"  # mlflow run ends it
    assert run.data.tags[tracking.TAG_ROLE] == "report" and run.data.params == {}
    assert "report.html" in {a.path for a in client.list_artifacts(mine)}


def test_no_log_leaves_the_store_alone(store, tmp_path):
    client, exp = store
    log_paper_scratch(client, exp)
    before = len(client.search_runs([exp]))
    assert report(tmp_path, log=False).report_run_id is None
    assert len(client.search_runs([exp])) == before


# --------------------------------------------------------------------------- bad input
def run_cli(*args: str):
    group = EpsstarGroup(commands={"report": report_command})
    return CliRunner().invoke(group, ["report", *args])


def one_line_error(result) -> str:
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    return lines[0]


def test_cli_reports_and_logs(store, tmp_path):
    client, exp = store
    log_paper_scratch(client, exp)
    result = run_cli("--experiment", "paper", "--out", str(tmp_path / "cli"), "--max-curves", "1")
    assert result.exit_code == 0, result.output
    assert "eps*=3.33/255 [2, 8]" in result.output and "report run " in result.output
    assert (tmp_path / "cli" / "report.html").is_file()


@pytest.mark.parametrize("args, message", [
    (["--experiment", "nope"], "no experiment named 'nope' in tracking store"),
    (["--experiment", "empty"], "no FINISHED epsstar runs in experiment 'empty'"),
    (["--parent", "0123456789abcdef"], "no run 0123456789abcdef in tracking store"),
    (["--study", "zzz"], "no FINISHED epsstar runs in tracking store"),
])
def test_cli_bad_selection(store, tmp_path, args, message):
    client, exp = store
    log_paper_scratch(client, exp)
    empty = client.create_experiment("empty")
    log_run(client, empty, best(0.1, 0.9, 0.4, 0.9), status="RUNNING")  # not finished
    assert message in one_line_error(run_cli(*args, "--out", str(tmp_path / "o"), "--no-log"))


def test_experiment_from_the_environment(store, tmp_path, monkeypatch):
    client, exp = store
    log_paper_scratch(client, exp)
    client.create_experiment("empty")
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "empty")
    with pytest.raises(EpsstarError, match="no FINISHED epsstar runs in experiment 'empty'"):
        report(tmp_path, log=False)
    assert only(report(tmp_path, log=False, experiments=("paper",))).threshold == 0.441


def test_cli_bad_store(tracking_store, tmp_path):  # noqa: F811 - fixture
    missing = f"sqlite:///{tmp_path}/typo.db"
    assert "does not exist" in one_line_error(run_cli("--tracking-uri", missing))
    assert not (tmp_path / "typo.db").exists()  # a report never creates a store
    started = time.monotonic()
    line = one_line_error(run_cli("--tracking-uri", "http://127.0.0.1:9", "--no-log"))
    assert "cannot reach tracking store http://127.0.0.1:9" in line
    assert time.monotonic() - started < 30
    (tmp_path / "file").write_text("")
    result = run_cli("--out", str(tmp_path / "file"))  # click's own check of the option
    assert result.exit_code == 2 and "is a file" in result.output
    with pytest.raises(ConfigError, match="is a file"):
        make_report(ReportConfig(out=tmp_path / "file"))


def test_config_checks():
    with pytest.raises(ConfigError, match="max_curves"):
        ReportConfig(max_curves=-1)
    assert issubclass(ConfigError, EpsstarError)


# --------------------------------------------------------------------------- end to end
def test_end_to_end_on_digits(tracking_store, tmp_path):  # noqa: F811 - fixture
    from epsstar.run import run_training

    exp = tracking.get_or_create_experiment("e2e")
    base = TrainConfig(**{**TINY, "epochs": 2})
    for eps in (0.0, 8 / 255, 64 / 255):
        run_training(base.replace(eps=eps), experiment_id=exp, log_model=False,
                     checkpoint_root=tmp_path / "ckpt", progress=False)
    result = make_report(ReportConfig(out=tmp_path / "out", n_boot=0))
    g = only(result)
    assert len(g.group.runs) == 3 and g.threshold > 0
    assert g.scratch is not None and math.isfinite(g.scratch.epsstar)
    assert (tmp_path / "out" / "report.html").stat().st_size > 10_000
    curves = list((tmp_path / "out" / "plots").glob("*-curve-*.png"))
    assert len(curves) == 3
    assert mlflow.MlflowClient().get_run(result.report_run_id).info.status == "FINISHED"


def test_command_is_a_click_command():
    assert isinstance(report_command, click.Command) and report_command.name == "report"


def test_learning_curves_figure_is_redrawn_per_run():
    from epsstar.plots import LearningCurves

    plotter = LearningCurves()
    plotter.draw({"train_adv_loss": [(1, 2.0), (2, 1.0)]}, best_epoch=2, title="a")
    plotter.draw({"test_adv_acc": [(e, 0.5) for e in range(1, 41)]}, gap=[(1, 3.0)],
                 best_epoch=math.nan, lr_drop_epoch=20, title="b")
    lines = plotter.lines
    assert list(lines["train", "_loss"].get_xdata()) == []  # nothing left of the first run
    assert list(lines["test", "_acc"].get_xdata()) == list(range(1, 41))
    assert plotter.axes[1].get_xlim()[1] >= 40
    assert not any(best.get_visible() for best, _ in plotter.marks)
    assert all(drop.get_visible() and drop.get_xdata()[0] == 20 for _, drop in plotter.marks)
    assert plotter.title.get_text() == "b"
