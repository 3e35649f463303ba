"""``epsstar report`` on 1,000 runs (a script, not a test). Results and the exact command:
report.md.

Builds a synthetic sqlite tracking store with the tracking contract's params, tags and metrics:
10 configuration groups (widths 16..160) × 100 runs (one clean run, 11 ε × 9 seeds from
scratch), each with its final ``best_*`` metrics and its last epoch's per-epoch metrics;
``--histories`` of them (every k-th run, each group's clean run among them) carry 30-epoch
histories. Then times the report stage by stage, in-process, and the whole ``epsstar report``
command in a fresh process (imports included), with and without learning curves and logging.

Usage:
    python benchmarks/bench_report.py --store /tmp/bench-report
"""

from __future__ import annotations

import argparse
import math
import random
import subprocess
import sys
import time
from pathlib import Path

import mlflow
from mlflow.entities import Metric, Param

from epsstar import report, tracking
from epsstar.config import TrainConfig

GROUPS = 10
EPS_255 = (0.5, 1, 1.5, 2, 3, 4, 6, 8, 12, 16, 24)  # 11 ε × 9 seeds + 1 clean = 100 runs
SEEDS = 9
EPOCHS = 30


def synthetic_metrics(eps_255: float, width: int, rng: random.Random) -> dict[str, float]:
    """Final metrics with the paper's shape: R̂ linear in ε, R*(0) = 0.44 (so ε* ≈ 3/255)."""
    train = 0.04 + 0.13 * eps_255 * (16 / width) ** 0.1 + rng.gauss(0, 0.01)
    test = 0.44 + 0.17 * eps_255 + rng.gauss(0, 0.01)
    acc = max(0.05, 0.99 - 0.06 * eps_255)
    return {"best_epoch": float(rng.randint(10, EPOCHS)), "best_train_adv_loss": train,
            "best_train_adv_acc": acc, "best_test_adv_loss": test,
            "best_test_adv_acc": max(0.0, acc - 0.1), "best_test_clean_loss": 0.44 + 0.01 * eps_255,
            "best_test_clean_acc": 0.87, "best_train_eval_loss": train, "train_seconds": 60.0,
            "train_adv_loss": train * 0.9, "test_adv_loss": test * 1.1,
            "train_adv_acc": acc, "test_adv_acc": max(0.0, acc - 0.12), "lr": 0.001}


def history(final: dict[str, float]) -> list[Metric]:
    """30 epochs decaying to the final values, lr /10 at 50 % and 75 %."""
    out = []
    for epoch in range(1, EPOCHS + 1):
        decay = math.exp(-epoch / 8)
        lr = 0.1 if epoch <= EPOCHS // 2 else 0.01 if epoch <= 3 * EPOCHS // 4 else 0.001
        values = {"train_adv_loss": final["train_adv_loss"] + 2 * decay,
                  "test_adv_loss": final["test_adv_loss"] + 2 * decay,
                  "train_adv_acc": final["train_adv_acc"] * (1 - decay),
                  "test_adv_acc": final["test_adv_acc"] * (1 - decay), "lr": lr}
        out += [Metric(k, v, 0, epoch) for k, v in values.items()]
    return out


def build_store(uri: str, artifacts: Path, n_histories: int) -> int:
    client = mlflow.MlflowClient(uri)
    exp = client.create_experiment("bench", artifact_location=str(artifacts.resolve()))
    rng = random.Random(0)
    runs = [(16 * (g + 1), eps, seed) for g in range(GROUPS)
            for eps, seed in [(0, 0)] + [(e, s) for e in EPS_255 for s in range(SEEDS)]]
    for i, (width, eps, seed) in enumerate(runs):
        cfg = TrainConfig(dataset="cifar10", arch="wrn34", width=width, eps=eps / 255, seed=seed,
                          epochs=EPOCHS)
        run = client.create_run(exp, run_name=tracking.default_run_name(cfg), tags={
            tracking.TAG_ROLE: cfg.role, tracking.TAG_HASH: cfg.config_hash()})
        final = synthetic_metrics(eps, width, rng)
        metrics = [Metric(k, v, 0, 0) for k, v in final.items()]
        if i % (len(runs) // n_histories) == 0:  # spread over the groups, clean runs included
            metrics += history(final)
        client.log_batch(run.info.run_id, metrics=metrics,
                         params=[Param(k, str(v)) for k, v in cfg.to_params().items()])
        client.set_terminated(run.info.run_id)
    return len(runs)


def time_stages(uri: str, out: Path) -> dict[str, float]:
    """Seconds per report stage, in-process (imports excluded), then the whole report again."""
    cfg = report.ReportConfig(tracking_uri=uri, out=out, log=True)
    client = report.open_client(uri)
    experiments = [e.experiment_id for e in client.search_experiments()]
    times = {}
    clock = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal clock
        times[name] = time.perf_counter() - clock
        clock = time.perf_counter()

    client.search_runs(experiments, max_results=1000)  # MLflow's own cost, for comparison
    lap("MLflow search_runs alone (1 page)")
    sel = report.read_runs(client, cfg)
    lap("read (paginated search_runs)")
    groups = report.compare_with_unstable([report.analyze_group(g, i + 1, n_boot=cfg.n_boot)
                                           for i, g in enumerate(report.group_runs(sel.records))])
    lap("group + estimates + bootstrap")
    curves = report.fetch_histories(client, report.curve_candidates(groups), cfg.max_curves)
    lap(f"histories ({len(curves)} runs x {len(report.HISTORY_METRICS)} metrics)")
    out.mkdir(parents=True, exist_ok=True)
    pngs = report.draw_figures(out, groups, curves)
    lap(f"figures ({len(pngs)} PNGs)")
    blocks = report.summary_blocks(sel, groups, curves, "now")
    (out / "report.html").write_text(report.render_html(blocks, out), encoding="utf-8")
    report.write_runs_csv(out / "runs.csv", sel, groups)
    lap("report.md/.html + runs.csv")
    result = report.make_report(cfg)  # the whole thing again, end to end, logged
    lap("make_report end to end (logged)")
    assert result.n_runs == GROUPS * 100 and len(result.groups) == GROUPS
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--store", type=Path, required=True, help="directory for the store")
    parser.add_argument("--histories", type=int, default=GROUPS * 100,
                        help="runs with 30-epoch histories (default: all, as training logs them)")
    args = parser.parse_args()
    args.store.mkdir(parents=True, exist_ok=True)
    uri = f"sqlite:///{args.store.resolve()}/mlflow.db"
    if not (args.store / "mlflow.db").exists():
        t = time.perf_counter()
        n = build_store(uri, args.store / "artifacts", args.histories)
        print(f"built {n} runs in {time.perf_counter() - t:.1f} s")
    for name, seconds in time_stages(uri, args.store / "out").items():
        print(f"{name:40s} {seconds:7.2f} s")
    command = [sys.executable, "-c", "from epsstar.cli.report import command; command()",
               "--tracking-uri", uri, "--out", str(args.store / "out-cli")]
    for extra, name in (((), "logged, 20 curves"), (("--no-log", "--max-curves", "0"),
                                                     "--no-log --max-curves 0")):
        t = time.perf_counter()
        subprocess.run([*command, *extra], check=True, capture_output=True)
        print(f"{'epsstar report ' + name:40s} {time.perf_counter() - t:7.2f} s")


if __name__ == "__main__":
    main()
