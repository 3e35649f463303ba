"""`epsstar train` from the command line: a real run, and every bad input as one clear line."""

from __future__ import annotations

import mlflow
import pytest
import torch
from _store import runs_with_status
from click.testing import CliRunner

from epsstar.cli import main

TINY_ARGS = ["--width", "16", "--epochs", "2", "--steps", "2", "--device", "cpu",
             "--log-model", "false"]


def _invoke(args):
    return CliRunner().invoke(main, ["train", *TINY_ARGS, *args])


def test_train_accepts_eps_as_fraction_and_logs_a_finished_run(tracking_store):
    result = _invoke(["--eps", "2/255"])
    assert result.exit_code == 0, result.output
    assert "(2/255)" in result.output
    (run,) = runs_with_status("FINISHED")
    assert float(run.data.params["eps"]) == pytest.approx(2 / 255)
    again = _invoke(["--eps", "0.00784313725490196"])
    assert "reused identical finished run" in again.output


def _corrupt(tmp_path):
    path = tmp_path / "broken.pt"
    torch.save({"format": 1, "model": {}}, path)
    path.write_bytes(path.read_bytes()[:30])
    return str(path)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--eps", "-1/255"], "eps must be >= 0"),
        (["--eps", "nan"], "eps must be finite"),
        (["--eps", "inf"], "eps must be finite"),
        (["--eps", "abc"], "cannot read eps"),
        (["--dataset", "imagenet"], "unknown dataset"),
        (["--arch", "vit"], "unknown arch"),
        (["--norm", "l1"], "'l1' is not one of"),
        (["--attack", "cw"], "'cw' is not one of"),
        (["--loss", "hinge"], "'hinge' is not one of"),
        (["--n-train", "999999"], "999999"),
        (["--dataset", "cifar10", "--data-dir", "nowhere"], "nowhere"),
        (["--init", "CORRUPT"], "cannot load checkpoint"),
    ],
)
def test_bad_input_is_one_clear_line_and_leaves_no_run(tracking_store, tmp_path, args, message):
    args = [_corrupt(tmp_path) if a == "CORRUPT" else a for a in args]
    result = _invoke(args)
    assert result.exit_code == 2, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 or lines[-1].startswith("Error: Invalid value"), result.stderr
    assert message in result.stderr
    assert "Traceback" not in result.output
    client = mlflow.MlflowClient()
    exps = [e.experiment_id for e in client.search_experiments()]
    assert not client.search_runs(exps)


def test_unreachable_tracking_server_is_one_clear_line(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")
    mlflow.set_tracking_uri("http://127.0.0.1:9")
    try:
        result = _invoke(["--eps", "1/255"])
    finally:
        mlflow.set_tracking_uri(None)
    assert result.exit_code == 2
    assert "cannot reach tracking store http://127.0.0.1:9" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
