"""``epsstar simulate``: the linear-regression phase transition (paper Section 4), tracked.

Prints one row per (d, n): d, n, √(d/n), ε*, ε*/√(d/n) and the number of search trials.
"""

from __future__ import annotations

from pathlib import Path

import click

from epsstar.cli._options import end_runs_on_sigterm
from epsstar.config import NORMS
from epsstar.simulate import SimulateConfig, parse_int_list

_DEFAULTS = SimulateConfig().to_params()  # as written on the command line ("2,5,10")


@click.command("simulate")
@click.option("--d", default=_DEFAULTS["d"], show_default=True,
              help="input dimensions, comma-separated")
@click.option("--n", default=_DEFAULTS["n"], show_default=True,
              help="training-set sizes, comma-separated")
@click.option("--norm", type=click.Choice(NORMS), default=_DEFAULTS["norm"],
              show_default=True, help="attack norm")
@click.option("--reps", type=int, default=_DEFAULTS["reps"], show_default=True,
              help="data sets per (d, n): a clean run and one run per eps on each")
@click.option("--n-eps", type=int, default=_DEFAULTS["n_eps"], show_default=True,
              help="grid points, log-spaced in eps/sqrt(d/n) over [1e-2, 1e2]")
@click.option("--sigma", type=float, default=_DEFAULTS["sigma"], show_default=True,
              help="noise standard deviation (||theta_0|| = 1)")
@click.option("--seed", type=int, default=_DEFAULTS["seed"], show_default=True, help="random seed")
@click.option("--rtol", type=float, default=_DEFAULTS["rtol"], show_default=True,
              help="relative bracket width at which the eps* search stops")
@click.option("--steps", type=int, default=_DEFAULTS["steps"], show_default=True,
              help="gradient-descent steps (the horizon early stopping chooses from)")
@click.option("--figure", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="also save the overview figure (all settings) to this PNG file")
def command(
    d: str,
    n: str,
    norm: str,
    reps: int,
    n_eps: int,
    sigma: float,
    seed: int,
    rtol: float,
    steps: int,
    figure: Path | None,
) -> None:
    """Clean vs adversarial gradient descent in linear regression; eps* per (d, n)."""
    import optuna

    from epsstar.simulate import format_table, plot, run

    cfg = SimulateConfig(d=parse_int_list(d, "--d"), n=parse_int_list(n, "--n"),
                         norm=norm, reps=reps, n_eps=n_eps, sigma=sigma, seed=seed, rtol=rtol,
                         steps=steps)
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # one line per trial drowns the table
    end_runs_on_sigterm()
    results = run(cfg)
    click.echo(format_table(results))
    if figure is not None:
        plot(results, cfg).savefig(figure, dpi=120)
        click.echo(f"figure: {figure}")
