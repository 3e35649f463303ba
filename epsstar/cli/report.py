"""``epsstar report``: the paper's tables and figures from a tracking store, per configuration."""

from __future__ import annotations

import click


@click.command("report")
@click.option("--tracking-uri", default=None,
              help="MLflow tracking URI [default: $MLFLOW_TRACKING_URI, else MLflow's default]")
@click.option("--experiment", "experiments", multiple=True,
              help="experiment name; repeat for several [default: $MLFLOW_EXPERIMENT_NAME, "
                   "else every experiment holding epsstar runs]")
@click.option("--study", default=None, help="only runs tagged epsstar.study=NAME")
@click.option("--parent", default=None, help="only this run's child runs (e.g. a search run)")
@click.option("--out", default="epsstar-report", show_default=True,
              type=click.Path(file_okay=False), help="output directory")
@click.option("--max-curves", type=click.IntRange(min=0), default=20, show_default=True,
              help="learning-curve figures at most (each fetches one run's metric history)")
@click.option("--bootstrap", "n_boot", type=click.IntRange(min=0), default=1000,
              show_default=True, help="bootstrap replicates for the eps* interval (0 = none)")
@click.option("--log/--no-log", default=True, show_default=True,
              help="log the report as a run (epsstar.role=report); --no-log for read-only stores")
def command(tracking_uri, experiments, study, parent, out, max_curves, n_boot, log) -> None:
    """Group the FINISHED runs by configuration and report R*(0), eps* (from scratch and from
    fine-tuning), Table 1, catastrophic overfitting and learning curves.

    Writes report.md, report.html (self-contained), runs.csv, groups.csv and plots/ to --out.
    Empty values of --experiment/--study/--parent mean "not given" (as MLproject passes them).
    """
    from pathlib import Path

    from epsstar.report import ReportConfig, describe_estimate, fmt, make_report

    cfg = ReportConfig(
        tracking_uri=tracking_uri or None, experiments=tuple(e for e in experiments if e),
        study=study or None, parent=parent or None, out=Path(out), max_curves=max_curves,
        log=log, n_boot=n_boot,
    )
    result = make_report(cfg)
    for g in result.groups:
        click.echo(f"{g.slug}: {g.label}: R*(0)={fmt(g.threshold)} "
                   f"eps*={describe_estimate(g.scratch)}")
    logged = f"; report run {result.report_run_id}" if result.report_run_id else ""
    click.echo(f"{result.n_runs} runs in {len(result.groups)} groups -> "
               f"{result.out / 'report.html'}{logged}")
