"""Algorithm A.1 against the reference search (a script, not a test). Results: finetune.md.

On one configuration (default: the TrainConfig defaults — digits, MLP width 64, 30 epochs, PGD-10
L∞), measured side by side in one run against one dedicated temporary tracking store:

(a) cost: each fine-tune's training time against one from-scratch run at the same attack and the
    one-point ε with the clean run's full schedule, as a ratio and the fraction saved (paper:
    ≥ 80 %), next to the ratio of epochs that the saving should follow.
(b) accuracy: the fine-tune ε̂ (multi-point and one-point, PGD and FGM fine-tunes) against the
    reference ε* that :func:`epsstar.search.find_epsstar` finds from from-scratch PGD runs
    (rtol 0.05), as a relative error.
(c) a diagnostic that is not Algorithm A.1: the same fine-tuned points extrapolated from a
    clean point taken from the clean checkpoint fine-tuned at ε = 0 with the same schedule
    (so both ends of the line have had the same extra training), to show how much of the
    error in (b) comes from the clean point.

Times are the runs' ``train_seconds`` (training and per-epoch evaluation, no tracking
overhead). The clean run is shared: the search trains it, the fine-tunes find it by config.

Usage:
    python benchmarks/bench_finetune.py                     # digits defaults, ~6 min on 2 cores
    python benchmarks/bench_finetune.py --eps-list 0.25/255,0.5/255,1/255 \
        --eps-list 2/255,4/255,8/255                        # two eps lists side by side
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import mlflow

from epsstar.config import SearchConfig, TrainConfig, parse_eps
from epsstar.estimate import Estimate, extrapolate_epsstar
from epsstar.finetune import FinetuneConfig, FinetuneResult, describe, finetune_epsstar
from epsstar.run import run_training
from epsstar.search import SearchResult, find_epsstar

ATTACKS = ("pgd", "fgm")


def _args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--eps-list", action="append", default=[],
                   help="fine-tune eps, comma-separated; repeat to compare lists "
                        "(default: FinetuneConfig's 0.25/255,0.5/255,1/255)")
    p.add_argument("--rtol", type=float, default=0.05, help="reference search tolerance")
    p.add_argument("--device", default="auto")
    p.add_argument("--store", default="", help="directory for the tracking store (kept)")
    return p.parse_args()


def _use_store(directory: Path) -> None:
    uri = f"sqlite:///{directory / 'mlflow.db'}"
    os.environ["MLFLOW_TRACKING_URI"] = uri
    for var in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME"):
        os.environ.pop(var, None)
    mlflow.set_tracking_uri(uri)


# --------------------------------------------------------------------------------- runs
def _reference(cfg: TrainConfig, rtol: float, root: Path) -> tuple[SearchResult, float]:
    """The search, and the training seconds of its adversarial runs (the clean run is shared)."""
    t0 = time.perf_counter()
    result = find_epsstar(cfg, SearchConfig(rtol=rtol), checkpoint_root=root, log_model=False)
    print(f"reference search: {describe(result.estimate)} in {result.n_adversarial_runs} runs, "
          f"{time.perf_counter() - t0:.0f} s wall", flush=True)
    client = mlflow.MlflowClient()
    seconds = sum(client.get_run(r["run_id"]).data.metrics["train_seconds"]
                  for r in result.trials if r["state"] == "COMPLETE")
    return result, seconds


def _finetunes(cfg: TrainConfig, eps_lists: list[tuple[float, ...]],
               root: Path) -> dict[str, FinetuneResult]:
    results = {}
    for eps_list in eps_lists:
        for attack in ATTACKS:
            ft = FinetuneConfig(eps_list=eps_list, attack=attack, compare_scratch=True)
            label = f"{attack} {','.join(f'{e * 255:g}' for e in ft.eps_list)}"
            t0 = time.perf_counter()
            results[label] = finetune_epsstar(cfg, ft, checkpoint_root=root, log_model=False)
            print(f"{label}: {time.perf_counter() - t0:.0f} s wall", flush=True)
    return results


def _control_clean_loss(result: FinetuneResult, root: Path) -> float:
    """Diagnostic (c): the clean checkpoint fine-tuned at ε = 0 with the fine-tunes' schedule."""
    cfg = result.template.replace(eps=0.0, attack="pgd", init=f"runs:/{result.clean_run_id}")
    outcome = run_training(cfg, checkpoint_root=root, log_model=False, progress=False)
    return outcome.metrics["best_train_adv_loss"]


def _with_clean_point(r: FinetuneResult, clean_loss: float) -> tuple[Estimate, Estimate]:
    eps, losses = [row["eps"] for row in r.rows], [row["loss"] for row in r.rows]
    one = next(row for row in r.rows if row["eps"] == r.one_point_eps)
    return (extrapolate_epsstar(eps, losses, clean_loss, r.threshold),
            extrapolate_epsstar([one["eps"]], [one["loss"]], clean_loss, r.threshold))


# --------------------------------------------------------------------------------- report
def _rel(estimate: Estimate, reference: float) -> str:
    """Relative error of a point estimate; a bound has none."""
    if estimate.bound is not None:
        return "(bound)"
    return f"{(estimate.epsstar - reference) / reference:+.1%}"


def _cost_table(results: dict[str, FinetuneResult], ref_seconds: float) -> list[str]:
    lines = ["| fine-tune | eps (/255) | fine-tune s | scratch s | ratio | epochs ratio | saved |",
             "|---|---|---|---|---|---|---|"]
    for label, r in results.items():
        scratch, epochs_ratio = r.scratch["seconds"], r.template.epochs / r.scratch["epochs"]
        for row in r.rows:
            ratio = row["seconds"] / scratch
            lines.append(f"| {label} | {row['eps_255']:.3g} | {row['seconds']:.2f} | "
                         f"{scratch:.2f} | {ratio:.3f} | {epochs_ratio:.3f} | {1 - ratio:.1%} |")
    lines += ["", "| fine-tune | all fine-tunes s | reference search s | mean saved per eps |",
              "|---|---|---|---|"]
    lines += [f"| {label} | {r.finetune_seconds:.1f} | {ref_seconds:.1f} | "
              f"{r.scratch['time_saved_fraction']:.1%} |" for label, r in results.items()]
    return lines


def _estimate_table(rows: dict[str, tuple[str, Estimate, Estimate]], star: float) -> list[str]:
    lines = ["| fine-tune | losses | multi-point eps* | error | 1-point eps* | error |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {label} | {losses} | {describe(e)} | {_rel(e, star)} | {describe(e1)} | "
              f"{_rel(e1, star)} |" for label, (losses, e, e1) in rows.items()]
    return lines


def _report(cfg: TrainConfig, ref: SearchResult, ref_seconds: float,
            results: dict[str, FinetuneResult], control: float) -> str:
    star = ref.estimate.epsstar
    some = next(iter(results.values()))
    clean_best = mlflow.MlflowClient().get_run(some.clean_run_id).data.metrics["best_epoch"]
    paper = {label: (", ".join(f"{row['loss']:.4f}" for row in r.rows), r.estimate,
                     r.estimate_1pt) for label, r in results.items()}
    diag = {label: (", ".join(f"{row['loss']:.4f}" for row in r.rows),
                    *_with_clean_point(r, control)) for label, r in results.items()}
    return "\n".join([
        f"config: {cfg.dataset}/{cfg.arch} width {cfg.width}, {cfg.epochs} epochs, {cfg.norm} "
        f"PGD-{cfg.steps}; fine-tunes {some.template.epochs} epochs, triangular lr peak "
        f"{some.template.lr:g}",
        f"R*(0) = {ref.threshold:.4f}; clean training loss {some.clean_train_loss:.4f} "
        f"(clean run best epoch {clean_best:.0f} of {cfg.epochs})",
        f"reference eps* (find_epsstar, {ref.n_adversarial_runs} from-scratch PGD runs, "
        f"{ref_seconds:.0f} s of adversarial training): {star * 255:.3f}/255 "
        f"[{ref.estimate.lower * 255:.3f}, {ref.estimate.upper * 255:.3f}]",
        "", "reference trials (eps /255: adv train loss): " + ", ".join(
            f"{t['eps_255']:.3g}: {t['adv_train_loss']:.4f}"
            for t in sorted(ref.trials, key=lambda t: t["eps"] or 0) if t["state"] == "COMPLETE"),
        "", "(a) cost (train_seconds)", "", *_cost_table(results, ref_seconds),
        "", "(b) Algorithm A.1 estimate vs reference", "", *_estimate_table(paper, star),
        "", f"(c) diagnostic: clean point from an eps = 0 fine-tune (loss {control:.4f}) instead "
        f"of the clean run ({some.clean_train_loss:.4f})", "", *_estimate_table(diag, star),
    ])


def main() -> None:
    args = _args()
    directory = Path(args.store or tempfile.mkdtemp(prefix="bench-finetune-"))
    directory.mkdir(parents=True, exist_ok=True)
    _use_store(directory)
    root = directory / "checkpoints"
    cfg = TrainConfig(device=args.device)
    eps_lists = [tuple(parse_eps(e) for e in text.split(",")) for text in args.eps_list]
    ref, ref_seconds = _reference(cfg, args.rtol, root)
    results = _finetunes(cfg, eps_lists or [FinetuneConfig().eps_list], root)
    control = _control_clean_loss(next(iter(results.values())), root)
    print(f"store: {directory}\n")
    print(_report(cfg, ref, ref_seconds, results, control))


if __name__ == "__main__":
    main()
