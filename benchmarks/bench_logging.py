"""MLflow logging overhead on the digits default (target: per-epoch logging <= 2% of epoch time).

Runs one tracked training run (`epsstar.run.run_training`) in a temporary sqlite store and times,
inside that same run, every per-epoch metric flush against the epoch it belongs to, plus the
one-off start (run creation, params) and end (final metrics, checkpoints, CSV, MLflow model).

    python benchmarks/bench_logging.py [--eps 8/255] [--epochs 30]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

from epsstar import run as run_module
from epsstar import tracking
from epsstar.config import TrainConfig, parse_eps


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--eps", default="8/255")
    parser.add_argument("--epochs", type=int, default=30)
    args = parser.parse_args()
    tmp = tempfile.mkdtemp()
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp}/mlflow.db"
    tracking.get_or_create_experiment()  # schema creation is not part of a run's cost

    flush_times: list[float] = []
    original = tracking.RunTracker.log_metrics

    def timed(self, metrics, step=0, **kw):
        t0 = time.perf_counter()
        original(self, metrics, step, **kw)
        if step > 0:
            flush_times.append(time.perf_counter() - t0)

    tracking.RunTracker.log_metrics = timed
    cfg = TrainConfig(eps=parse_eps(args.eps), epochs=args.epochs, device="cpu")
    t0 = time.perf_counter()
    outcome = run_module.run_training(cfg, checkpoint_root=f"{tmp}/ckpt", progress=False)
    total = time.perf_counter() - t0
    train = outcome.metrics["train_seconds"]
    per_epoch = train / cfg.epochs
    flush = sum(flush_times) / len(flush_times)
    print(f"config: digits mlp width {cfg.width}, eps {args.eps}, PGD-{cfg.steps}, "
          f"{cfg.epochs} epochs, batch {cfg.batch_size}")
    print(f"epoch time (training + evaluation + checkpoint): {per_epoch * 1000:.1f} ms")
    print(f"per-epoch MLflow flush (8 metrics, one log_batch): {flush * 1000:.2f} ms "
          f"= {100 * flush / per_epoch:.2f}% of an epoch")
    print(f"whole run {total:.2f} s, of which training {train:.2f} s; one-off start/end "
          f"(run, params, artifacts, MLflow model) {total - train - sum(flush_times):.2f} s")


if __name__ == "__main__":
    main()
