"""Algorithm A.1 against the reference search (a script, not a test). Results: finetune.md.

On one configuration (default: the TrainConfig defaults — digits, MLP width 64, 30 epochs, PGD-10
L∞), measured side by side in one run against one dedicated temporary tracking store:

(a) cost: each fine-tune's training time against one from-scratch run at the same ε and attack
    (the one-point ε, the clean run's full schedule), as a ratio and the fraction saved (paper:
    ≥ 80 %); and the whole fine-tune estimate against the whole reference search.
(b) accuracy: the fine-tune ε̂ (multi-point and one-point, PGD and FGM fine-tunes) against the
    reference ε* that :func:`epsstar.search.find_epsstar` finds from from-scratch PGD runs
    (rtol 0.05), as a relative error.

Times are the runs' ``train_seconds`` (training and per-epoch evaluation, no tracking
overhead). The clean run is shared: the search trains it, the fine-tunes find it by config.

Usage:
    python benchmarks/bench_finetune.py                     # digits defaults, ~5 min on 2 cores
    python benchmarks/bench_finetune.py --eps-list 1/1020,1/510,1/255 --eps-list 2/255,4/255,8/255
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import mlflow

from epsstar.config import SearchConfig, TrainConfig, parse_eps
from epsstar.finetune import FinetuneConfig, FinetuneResult, describe, finetune_epsstar
from epsstar.search import SearchResult, find_epsstar

ATTACKS = ("pgd", "fgm")


def _args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--eps-list", action="append", default=[],
                   help="fine-tune eps, comma-separated; repeat to compare lists "
                        "(default: FinetuneConfig's 0.25/255,0.5/255,1/255)")
    p.add_argument("--rtol", type=float, default=0.05, help="reference search tolerance")
    p.add_argument("--device", default="auto")
    p.add_argument("--store", default="", help="directory for the temporary store (kept)")
    return p.parse_args()


def _use_fresh_store(directory: Path) -> None:
    uri = f"sqlite:///{directory / 'mlflow.db'}"
    os.environ["MLFLOW_TRACKING_URI"] = uri
    for var in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME"):
        os.environ.pop(var, None)
    mlflow.set_tracking_uri(uri)


def _reference(cfg: TrainConfig, rtol: float, root: Path) -> tuple[SearchResult, float]:
    t0 = time.perf_counter()
    result = find_epsstar(cfg, SearchConfig(rtol=rtol), checkpoint_root=root, log_model=False)
    print(f"reference search: {describe(result.estimate)} in {result.n_adversarial_runs} runs, "
          f"{time.perf_counter() - t0:.0f} s wall", flush=True)
    return result, time.perf_counter() - t0


def _search_seconds(result: SearchResult) -> float:
    """Training seconds of the search's adversarial runs (the clean run is shared)."""
    client = mlflow.MlflowClient()
    return sum(client.get_run(r["run_id"]).data.metrics["train_seconds"]
               for r in result.trials if r["state"] == "COMPLETE")


def _finetune(cfg: TrainConfig, ft: FinetuneConfig, root: Path) -> tuple[FinetuneResult, float]:
    t0 = time.perf_counter()
    result = finetune_epsstar(cfg, ft, checkpoint_root=root, log_model=False)
    return result, time.perf_counter() - t0


def _rel(estimate: float, reference: float) -> str:
    return f"{(estimate - reference) / reference:+.1%}"


def _label(ft: FinetuneConfig) -> str:
    return f"{ft.attack} {','.join(f'{e * 255:g}' for e in ft.eps_list)}"


def _report(cfg: TrainConfig, ref: SearchResult, ref_seconds: float,
            results: dict[str, FinetuneResult]) -> str:
    star = ref.estimate.epsstar
    lines = [
        f"config: {cfg.dataset}/{cfg.arch} width {cfg.width}, {cfg.epochs} epochs, {cfg.norm} "
        f"PGD-{cfg.steps}; R*(0) = {ref.threshold:.4f}",
        f"reference eps* (find_epsstar, {ref.n_adversarial_runs} from-scratch PGD runs, "
        f"{ref_seconds:.0f} s of adversarial training): {star * 255:.3f}/255 "
        f"[{ref.estimate.lower * 255:.3f}, {ref.estimate.upper * 255:.3f}]",
        "",
        "(a) cost (train_seconds)",
        "",
        "| attack, eps list (/255) | eps (/255) | fine-tune s | scratch s (at one-point eps) "
        "| ratio | saved |",
        "|---|---|---|---|---|---|",
    ]
    for label, r in results.items():
        scratch = r.scratch["seconds"]
        for row in r.rows:
            lines.append(f"| {label} | {row['eps_255']:.3g} | {row['seconds']:.2f} | "
                         f"{scratch:.2f} | {row['seconds'] / scratch:.3f} | "
                         f"{1 - row['seconds'] / scratch:.1%} |")
    lines += ["", "| attack, eps list (/255) | all fine-tunes s | reference search s "
              "| mean time saved per eps |",
              "|---|---|---|---|"]
    for label, r in results.items():
        lines.append(f"| {label} | {r.finetune_seconds:.1f} | {ref_seconds:.1f} | "
                     f"{r.scratch['time_saved_fraction']:.1%} |")
    lines += ["", "(b) estimate vs reference", "",
              "| attack, eps list (/255) | fine-tune losses | multi-point eps* | error "
              "| 1-point eps* | error |", "|---|---|---|---|---|---|"]
    for label, r in results.items():
        losses = ", ".join(f"{row['loss']:.4f}" for row in r.rows)
        e, e1 = r.estimate, r.estimate_1pt
        lines.append(f"| {label} | {losses} | {describe(e)} | {_rel(e.epsstar, star)} | "
                     f"{describe(e1)} | {_rel(e1.epsstar, star)} |")
    return "\n".join(lines)


def main() -> None:
    args = _args()
    directory = Path(args.store or tempfile.mkdtemp(prefix="bench-finetune-"))
    directory.mkdir(parents=True, exist_ok=True)
    _use_fresh_store(directory)
    root = directory / "checkpoints"
    cfg = TrainConfig(device=args.device)
    eps_lists = [tuple(parse_eps(e) for e in text.split(",")) for text in args.eps_list]
    ref, _ = _reference(cfg, args.rtol, root)
    ref_seconds = _search_seconds(ref)
    results = {}
    for eps_list in eps_lists or [FinetuneConfig().eps_list]:
        for attack in ATTACKS:
            ft = FinetuneConfig(eps_list=eps_list, attack=attack, compare_scratch=True)
            results[_label(ft)], wall = _finetune(cfg, ft, root)
            print(f"{_label(ft)}: fine-tunes done in {wall:.0f} s wall", flush=True)
    print(f"store: {directory}\n")
    print(_report(cfg, ref, ref_seconds, results))


if __name__ == "__main__":
    main()
