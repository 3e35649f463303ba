"""``epsstar finetune``: the fast ε* estimate of Algorithm A.1 (SPEC §5) — short adversarial
fine-tunes of the clean checkpoint and a straight-line extrapolation to R*(0)."""

from __future__ import annotations

import click

from epsstar.cli._common import EPS, EPS_LIST
from epsstar.cli._options import (
    config_from_kwargs,
    end_runs_on_sigterm,
    run_options,
    train_options,
)
from epsstar.config import ATTACKS

# The defaults of epsstar.finetune.FinetuneConfig, repeated so `epsstar --help` does not import
# torch and MLflow (tests check they agree).
_DEFAULTS = {"eps_list": "0.25/255,0.5/255,1/255", "attack": "pgd", "epochs_fraction": 0.2,
             "epochs": 0}


@click.command("finetune")
@train_options(exclude=("eps", "attack"))
@click.option("--eps-list", type=EPS_LIST, default=_DEFAULTS["eps_list"], show_default=True,
              help="fine-tune radii, pixel units, comma-separated, each > 0")
@click.option("--attack", type=click.Choice(ATTACKS), default=_DEFAULTS["attack"],
              show_default=True, help="fine-tuning attack (fgm: faster, similar estimates)")
@click.option("--epochs-fraction", type=click.FloatRange(0, 1, min_open=True),
              default=_DEFAULTS["epochs_fraction"], show_default=True,
              help="fine-tune epochs as a fraction of the clean run's epochs (paper: 40/200)")
@click.option("--finetune-epochs", type=click.IntRange(min=0), default=_DEFAULTS["epochs"],
              show_default=True, help="fine-tune epochs; > 0 overrides --epochs-fraction")
@click.option("--one-point-eps", type=EPS, default=0.0,
              help="eps of the one-point estimate, one of --eps-list [default: the middle one]")
@click.option("--clean-run", default="",
              help="fine-tune this FINISHED clean run (its data and model must match the "
                   "options; its lr, epochs, batch size and seed set the fine-tunes') "
                   "[default: the clean run of these options, trained if missing]")
@click.option("--compare-scratch", type=click.BOOL, default=False, show_default=True,
              help="also train one from-scratch run at the one-point eps and log the time "
                   "saved (true|false)")
@run_options
def command(eps_list, attack, epochs_fraction, finetune_epochs, one_point_eps, clean_run,
            compare_scratch, experiment, checkpoint_dir, download, log_model, **kwargs) -> None:
    """Estimate eps* by fine-tuning the clean model adversarially at a few small eps.

    Every fine-tune is a child MLflow run of one parent run (epsstar.role=finetune-search) that
    holds epsstar_ft (all eps) and epsstar_ft_1pt (one eps). Identical finished runs are reused.
    The training options name the clean run (--epochs, --schedule, --lr...: the clean run's);
    the attack options (--attack, --norm, --steps, --step-size, --loss, --beta) apply to the
    fine-tunes.
    """
    from epsstar import tracking
    from epsstar.finetune import FinetuneConfig, finetune_epsstar, summary_line

    cfg = config_from_kwargs(kwargs)
    ft = FinetuneConfig(eps_list=eps_list, attack=attack, epochs_fraction=epochs_fraction,
                        epochs=finetune_epochs, one_point_eps=one_point_eps,
                        clean_run_id=clean_run, compare_scratch=compare_scratch)
    end_runs_on_sigterm()
    experiment_id = tracking.get_or_create_experiment(experiment)
    result = finetune_epsstar(cfg, ft, experiment_id=experiment_id,
                              checkpoint_root=checkpoint_dir, log_model=log_model,
                              download=download, echo=lambda line: click.echo(line, err=True))
    click.echo(summary_line(result))
