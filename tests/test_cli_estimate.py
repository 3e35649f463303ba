"""``epsstar estimate FILE.csv``: the paper tables through the command line, and every bad input."""

from __future__ import annotations

import json
from pathlib import Path

import click
import pytest
from click.testing import CliRunner, Result

from epsstar.cli._common import EpsstarGroup
from epsstar.cli.estimate import command
from epsstar.config import ConfigError

PAPER = Path(__file__).parents[2] / "shared" / "paper"
SCRATCH = PAPER / "cifar10_scratch.csv"
FINETUNE = PAPER / "cifar10_finetune.csv"
JSON_KEYS = {"epsstar", "lower", "upper", "bound", "method", "threshold", "isotonic"}


@click.group(cls=EpsstarGroup)
def cli() -> None:
    """The error policy of the real ``epsstar`` group, with this command alone."""


cli.add_command(command)


def _run(*args: str | Path) -> Result:
    return CliRunner().invoke(cli, ["estimate", *map(str, args)])


def _json(*args: str | Path) -> dict:
    result = _run(*args, "--json")
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert set(out) == JSON_KEYS
    return out


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "runs.csv"
    path.write_text(text)
    return path


# ------------------------------------------------------------------ paper numbers


@pytest.mark.parametrize(("n", "published"), [("10000", 3.33), ("50000", 0.55)])
def test_scratch_tables_reproduce_paper(n: str, published: float) -> None:
    out = _json(SCRATCH, "--filter", f"n={n}")
    assert round(out["epsstar"], 2) == published
    assert out["bound"] is None and out["method"] == "interpolation"
    assert out["lower"] < out["epsstar"] < out["upper"]


def test_threshold_defaults_to_clean_rows_test_loss() -> None:
    assert _json(SCRATCH, "--filter", "n=10000")["threshold"] == 0.441
    assert _json(SCRATCH, "--filter", "n=10000", "--threshold", "0.3")["threshold"] == 0.3


@pytest.mark.parametrize(
    ("extra", "published", "method"),
    [
        ((), 2.50, "extrapolation"),
        (("--attack", "pgd", "--only-eps", "0.5"), 4.70, "extrapolation-1pt"),
        (("--attack", "fgm"), 2.08, "extrapolation"),
        (("--attack", "fgm", "--only-eps", "0.5"), 1.73, "extrapolation-1pt"),
    ],
)
def test_finetune_table_reproduces_paper(
    extra: tuple[str, ...], published: float, method: str
) -> None:
    out = _json(FINETUNE, "--finetune", "--threshold", "0.441", *extra)
    assert round(out["epsstar"], 2) == published
    assert out["method"] == method


def test_human_summary_is_one_line() -> None:
    result = _run(SCRATCH, "--filter", "n=10000")
    assert result.exit_code == 0
    assert result.stdout == "eps* = 3.328 in [2, 8]; interpolation, threshold R*(0) = 0.441\n"


def test_lower_bound_prints_null_for_infinity() -> None:
    out = _json(SCRATCH, "--filter", "n=10000", "--threshold", "5")
    assert (out["epsstar"], out["lower"], out["upper"], out["bound"]) == (8.0, 8.0, None, "above")
    summary = _run(SCRATCH, "--filter", "n=10000", "--threshold", "5").stdout
    assert summary.startswith("eps* > 8 ")


# ------------------------------------------------------------------ columns and row selection


def test_eps_column_and_attack_column_select_scratch_rows(tmp_path: Path) -> None:
    # the fgm row would cross first if it were used; from-scratch rows are none and pgd
    path = _write(
        tmp_path,
        "eps,attack,adv_train_loss,adv_test_loss\n"
        "0,none,0.1,0.5\n1,fgm,0.9,\n1,pgd,0.3,\n2,pgd,0.7,\n",
    )
    out = _json(path)
    assert out["epsstar"] == pytest.approx(1.5)


def test_non_monotone_table_is_flagged(tmp_path: Path) -> None:
    path = _write(tmp_path, "eps,adv_train_loss\n1,0.4\n2,0.3\n3,0.6\n")
    out = _json(path, "--threshold", "0.5")
    assert out["isotonic"] is True
    assert "isotonic fit" in _run(path, "--threshold", "0.5").stdout


def test_filter_compares_numbers_and_strings(tmp_path: Path) -> None:
    path = _write(
        tmp_path,
        "eps,adv_train_loss,norm\n0,0.1,linf\n1,0.3,linf\n2,0.7,linf\n1,0.9,l2\n",
    )
    assert _json(path, "--threshold", "0.5", "--filter", "norm=linf")["epsstar"] == 1.5
    assert _json(path, "--threshold", "0.5", "--filter", "eps=1.0")["epsstar"] != 1.5


def test_bootstrap_replaces_bracket_with_interval(tmp_path: Path) -> None:
    rows = ["eps,adv_train_loss"] + [
        f"{e},{0.1 * e + d}" for e in (1, 2, 4, 8) for d in (-0.04, 0.0, 0.05)
    ]
    path = _write(tmp_path, "\n".join(rows) + "\n")
    plain = _json(path, "--threshold", "0.5")
    boot = _json(path, "--threshold", "0.5", "--bootstrap")
    assert boot["method"] == "interpolation+bootstrap"
    assert boot["epsstar"] == plain["epsstar"]
    assert boot["lower"] < boot["epsstar"] < boot["upper"]
    assert (boot["lower"], boot["upper"]) != (plain["lower"], plain["upper"])


# ------------------------------------------------------------------ bad input


@pytest.mark.parametrize(
    ("csv_text", "args", "message"),
    [
        ("e,loss\n0,0.1\n", (), "missing required column(s): eps (or eps_255), adv_train_loss"),
        ("eps,adv_test_loss\n0,0.1\n", (), "missing required column(s): adv_train_loss"),
        ("eps,adv_train_loss\n0,0.1\n1,abc\n", ("--threshold", "1"),
         "column 'adv_train_loss', data row 2 has 'abc', not a finite number"),
        ("eps,adv_train_loss\n0,0.1\n,0.2\n", ("--threshold", "1"),
         "column 'eps', data row 2 is empty"),
        ("eps,adv_train_loss,adv_test_loss\n0,0.1,x\n", (), "column 'adv_test_loss', data row 1"),
        ("eps,adv_train_loss,adv_test_loss\n1,0.1,0.5\n", (),
         "no eps = 0 row with an adv_test_loss"),
        ("eps,adv_train_loss\n0,0.1\n", (), "pass --threshold"),
        ("eps,attack,adv_train_loss\n0,none,0.1\n1,fgm,0.2\n", ("--finetune", "--threshold", "1"),
         "at least one fine-tuned row (eps > 0, attack pgd)"),
        ("eps,adv_train_loss\n1,0.2\n", ("--finetune", "--threshold", "1"), "needs an eps = 0 row"),
        ("eps,attack,adv_train_loss\n0,clean,0.1\n", ("--threshold", "1"), "column 'attack' has"),
        ("eps,adv_train_loss\n-1,0.1\n", ("--threshold", "1"), "eps must be >= 0"),
        ("eps,adv_train_loss\n0,0.1\n", ("--filter", "eps"), "--filter expects COL=VALUE"),
        ("eps,adv_train_loss\n0,0.1\n", ("--filter", "n=1"), "no column 'n'"),
        ("eps,adv_train_loss\n0,0.1\n", ("--filter", "eps=a"), "'a' is not one"),
        ("eps,adv_train_loss\n0,0.1\n", ("--filter", "eps=3"), "no rows left after --filter eps=3"),
        ("eps,attack,adv_train_loss\n0,fgm,0.1\n", ("--threshold", "1"), "no from-scratch rows"),
        ("eps,adv_train_loss\n0,0.1\n1,0.2\n", ("--threshold", "1", "--bootstrap"),
         "two or more runs"),
        ("eps,adv_train_loss\n", ("--threshold", "1"), "has no data rows"),
        ("", (), "cannot read"),
    ],
)
def test_bad_csv_is_one_line_error_with_exit_2(
    tmp_path: Path, csv_text: str, args: tuple[str, ...], message: str
) -> None:
    result = _run(_write(tmp_path, csv_text), *args)
    assert result.exit_code == 2
    assert result.stderr.startswith("Error: ") and result.stderr.count("\n") == 1
    assert message in result.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--attack", "fgm"), "add --finetune"),
        (("--only-eps", "0.5"), "add --finetune"),
        (("--finetune", "--bootstrap"), "--bootstrap applies to from-scratch"),
    ],
)
def test_options_that_would_be_ignored_are_errors(args: tuple[str, ...], message: str) -> None:
    result = _run(FINETUNE, "--threshold", "0.441", *args)
    assert result.exit_code == 2 and message in result.stderr


def test_missing_file_is_an_error(tmp_path: Path) -> None:
    result = _run(tmp_path / "nope.csv")
    assert result.exit_code == 2
    assert f"file not found: {tmp_path / 'nope.csv'}" in result.stderr


def test_command_alone_fails_non_zero_on_bad_input(tmp_path: Path) -> None:
    result = CliRunner().invoke(command, [str(tmp_path / "nope.csv")])
    assert result.exit_code != 0
    assert isinstance(result.exception, ConfigError)
