"""``epsstar estimate FILE.csv``: ε* from a table of finished runs (SPEC §3 and §5).

One row per training run, read at its early-stopping epoch. Columns:

- ``eps`` (or ``eps_255``): attack strength. The result is in the same unit as this column.
- ``adv_train_loss``: R̂(θ̂(ε), ε), the adversarial training loss at the best epoch.
- ``adv_test_loss`` (optional): on the ε = 0 row (attack ``none``) this is R*(0), the threshold.
- ``attack`` (optional): ``none`` (clean run) | ``pgd`` | ``fgm``. From-scratch estimates use the
  ``none`` and ``pgd`` rows; ``--finetune`` uses the ε = 0 row and the rows of ``--attack``.
- any other column can select rows with ``--filter COL=VALUE`` (e.g. ``n=10000``).

``--json`` prints ``{"epsstar", "lower", "upper", "bound", "method", "threshold", "isotonic"}``;
infinite values (the open end of an ``"above"`` bound) are written as ``null`` so the output is
valid JSON.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import click

from epsstar.config import ConfigError

if TYPE_CHECKING:  # pandas and the estimators load only when the command runs
    import pandas as pd

    from epsstar.estimate import Estimate

ATTACK_VALUES = ("none", "pgd", "fgm")
SCRATCH_ATTACKS = ("none", "pgd")  # rows that are from-scratch runs (the clean run included)
EPS_COLUMNS = ("eps", "eps_255")  # eps_255 is the name the paper tables use


# ---------------------------------------------------------------------------------------------
# reading and selecting rows


def _read_csv(path: Path) -> pd.DataFrame:
    import pandas as pd

    if not path.is_file():
        raise ConfigError(f"file not found: {path}")
    try:
        df = pd.read_csv(path, skipinitialspace=True)
    except (pd.errors.EmptyDataError, pd.errors.ParserError, UnicodeDecodeError) as err:
        reason = " ".join(str(err).split())  # pandas messages can span lines; ours are one line
        raise ConfigError(f"cannot read {path} as CSV: {reason}") from None
    if df.empty:
        raise ConfigError(f"{path} has no data rows")
    return df


def _eps_column(df: pd.DataFrame, path: Path) -> str:
    """The ε column's name; raises naming every missing required column."""
    eps_col = next((c for c in EPS_COLUMNS if c in df.columns), None)
    missing = [] if eps_col else ["eps (or eps_255)"]
    missing += [] if "adv_train_loss" in df.columns else ["adv_train_loss"]
    if missing:
        raise ConfigError(f"{path} is missing required column(s): {', '.join(missing)}")
    return eps_col


def _apply_filters(df: pd.DataFrame, filters: Sequence[str]) -> pd.DataFrame:
    for item in filters:
        col, sep, value = (part.strip() for part in item.partition("="))
        if not sep or not col:
            raise ConfigError(f"--filter expects COL=VALUE, got {item!r}")
        if col not in df.columns:
            raise ConfigError(f"--filter {item}: no column {col!r} (have: {', '.join(df.columns)})")
        df = df[_matches(df[col], value, item)]
    if df.empty:
        raise ConfigError(f"no rows left after --filter {' '.join(filters)}")
    return df


def _matches(column: pd.Series, value: str, item: str) -> pd.Series:
    """Rows whose cell equals ``value``: numerically for numeric columns (10000 == 1e4)."""
    import numpy as np
    import pandas as pd

    if not pd.api.types.is_numeric_dtype(column):
        return column.astype(str).str.strip() == value
    try:
        target = float(value)
    except ValueError:
        raise ConfigError(f"--filter {item}: column holds numbers, {value!r} is not one") from None
    return pd.Series(np.isclose(column.astype(float), target), index=column.index)


def _numeric(df: pd.DataFrame, col: str, *, required: bool) -> pd.Series:
    """The column as finite floats; an empty cell is allowed only when not ``required``."""
    import numpy as np
    import pandas as pd

    values = pd.to_numeric(df[col], errors="coerce").astype(float)
    bad = ~np.isfinite(values) & (df[col].notna() | required)
    if bad.any():
        label = bad.idxmax()  # the first bad row (index labels are 0-based data rows)
        raw = df[col][label]
        what = "is empty" if pd.isna(raw) else f"has {raw!r}, not a finite number"
        raise ConfigError(f"column {col!r}, data row {label + 1} {what}")
    return values


def _normalize(df: pd.DataFrame, eps_col: str) -> pd.DataFrame:
    """Validated table with numeric ``eps``/``adv_train_loss``/``adv_test_loss`` and ``attack``."""
    out = df.copy()
    out["eps"] = _numeric(df, eps_col, required=True)
    out["adv_train_loss"] = _numeric(df, "adv_train_loss", required=True)
    if "adv_test_loss" in df.columns:
        out["adv_test_loss"] = _numeric(df, "adv_test_loss", required=False)
    if "attack" in df.columns:
        out["attack"] = df["attack"].astype(str).str.strip().str.lower()
        unknown = sorted(set(out["attack"]) - set(ATTACK_VALUES))
        if unknown:
            allowed = ", ".join(ATTACK_VALUES)
            raise ConfigError(f"column 'attack' has {unknown}; use one of {allowed}")
    return out


def _rows_with_attack(table: pd.DataFrame, attacks: Sequence[str]) -> pd.DataFrame:
    """Rows whose attack is in ``attacks``; a table without the column is taken as all matching."""
    return table[table["attack"].isin(attacks)] if "attack" in table.columns else table


# ---------------------------------------------------------------------------------------------
# the two estimates


def _table_threshold(table: pd.DataFrame) -> float:
    """R*(0): the mean adv_test_loss of the clean (ε = 0, attack none) rows."""
    missing = "no eps = 0 row with an adv_test_loss to take R*(0) from; pass --threshold"
    if "adv_test_loss" not in table.columns:
        raise ConfigError(missing)
    clean = _rows_with_attack(table[table["eps"] == 0], ("none",))
    losses = clean["adv_test_loss"].dropna()
    if losses.empty:
        raise ConfigError(missing)
    return float(losses.mean())


def _scratch(table: pd.DataFrame, threshold: float, bootstrap: bool) -> Estimate:
    from epsstar.estimate import bootstrap_epsstar, interpolate_epsstar

    rows = _rows_with_attack(table, SCRATCH_ATTACKS)
    if rows.empty:
        raise ConfigError("no from-scratch rows (attack none or pgd) to interpolate")
    estimate = interpolate_epsstar(rows["eps"], rows["adv_train_loss"], threshold)
    if not bootstrap:
        return estimate
    lower, upper = bootstrap_epsstar(rows["eps"], rows["adv_train_loss"], threshold)
    return dataclasses.replace(estimate, lower=lower, upper=upper, method="interpolation+bootstrap")


def _finetune(
    table: pd.DataFrame, threshold: float, attack: str, only_eps: float | None
) -> Estimate:
    import numpy as np

    from epsstar.estimate import extrapolate_epsstar

    clean = table[table["eps"] == 0]
    if clean.empty:
        raise ConfigError("--finetune needs an eps = 0 row: its adv_train_loss is the clean loss")
    tuned = _rows_with_attack(table[table["eps"] > 0], (attack,))
    if only_eps is not None:
        tuned = tuned[np.isclose(tuned["eps"], only_eps)]
    if tuned.empty:
        where = f"attack {attack}" + ("" if only_eps is None else f", eps {only_eps:g}")
        raise ConfigError(f"--finetune needs at least one fine-tuned row (eps > 0, {where})")
    clean_loss = float(clean["adv_train_loss"].mean())
    return extrapolate_epsstar(tuned["eps"], tuned["adv_train_loss"], clean_loss, threshold)


# ---------------------------------------------------------------------------------------------
# output


def _as_json(estimate: Estimate) -> str:
    # JSON has no infinity: the open end of a bound is null
    fields = {
        k: None if isinstance(v, float) and math.isinf(v) else v
        for k, v in estimate.to_dict().items()
    }
    return json.dumps(fields)


_BOUND_TEXT = {
    None: "eps* = {epsstar:.4g} in [{lower:.4g}, {upper:.4g}]",
    "above": "eps* > {lower:.4g} (every tried eps stayed at or below the threshold)",
    "below": "eps* < {upper:.4g} (even the smallest tried eps is above the threshold)",
}


def _summary(estimate: Estimate) -> str:
    head = _BOUND_TEXT[estimate.bound].format(**estimate.to_dict())
    tail = "; isotonic fit of a non-monotone curve" if estimate.isotonic else ""
    return f"{head}; {estimate.method}, threshold R*(0) = {estimate.threshold:.4g}{tail}"


# ---------------------------------------------------------------------------------------------
# the command


def _check_options(finetune: bool, attack: str | None, only_eps: float | None, boot: bool) -> None:
    # options that would otherwise be silently ignored are mistakes
    if not finetune and (attack is not None or only_eps is not None):
        raise ConfigError("--attack and --only-eps select fine-tuned rows; add --finetune")
    if finetune and boot:
        raise ConfigError("--bootstrap applies to from-scratch interpolation, not --finetune")


@click.command("estimate")
@click.argument("csv_path", metavar="FILE.csv", type=click.Path(path_type=Path))
@click.option("--threshold", type=float, default=None,
              help="R*(0); default: adv_test_loss of the eps = 0 row.")
@click.option("--finetune", is_flag=True,
              help="Extrapolate from fine-tuned rows (SPEC §5); the eps = 0 row's adv_train_loss "
                   "is the clean training loss.")
@click.option("--attack", type=click.Choice(["pgd", "fgm"]), default=None,
              help="Which fine-tuned rows to use with --finetune (default pgd).")
@click.option("--only-eps", type=float, default=None,
              help="One-point estimate from the fine-tuned row at this eps (CSV units).")
@click.option("--filter", "filters", multiple=True, metavar="COL=VALUE",
              help="Keep rows whose COL equals VALUE (repeatable), e.g. --filter n=10000.")
@click.option("--bootstrap", is_flag=True,
              help="Report a 90% percentile-bootstrap interval over repeated seeds as "
                   "lower/upper (method interpolation+bootstrap).")
@click.option("--json", "as_json", is_flag=True, help="Print the estimate as JSON (inf as null).")
def command(
    csv_path: Path,
    threshold: float | None,
    finetune: bool,
    attack: str | None,
    only_eps: float | None,
    filters: tuple[str, ...],
    bootstrap: bool,
    as_json: bool,
) -> None:
    """Estimate eps* from FILE.csv (one row per run; eps in the CSV's units)."""
    _check_options(finetune, attack, only_eps, bootstrap)
    df = _read_csv(csv_path)
    eps_col = _eps_column(df, csv_path)
    table = _normalize(_apply_filters(df, filters), eps_col)
    if threshold is None:
        threshold = _table_threshold(table)
    if finetune:
        estimate = _finetune(table, threshold, attack or "pgd", only_eps)
    else:
        estimate = _scratch(table, threshold, bootstrap)
    click.echo(_as_json(estimate) if as_json else _summary(estimate))
