"""Measure the digits default's loss-vs-eps curve (the oracle for search_efficiency.py).

Trains the default configuration (epsstar.config.TrainConfig(): digits, MLP width 64, L-inf
PGD-10, 30 epochs) from scratch at a grid of eps and writes benchmarks/digits_curve.csv in the
column layout of the paper table (../shared/paper/cifar10_scratch.csv).

    python benchmarks/digits_curve.py          # about 2 minutes on 2 CPU cores
"""

from __future__ import annotations

import csv
import tempfile
from pathlib import Path

from epsstar.config import TrainConfig
from epsstar.data import load_data
from epsstar.train import fit

GRID_255 = (0, 2, 4, 6, 8, 10, 12, 16, 24, 32)
OUT = Path(__file__).with_name("digits_curve.csv")


def main() -> None:
    base = TrainConfig(device="cpu")
    data = load_data(base)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for eps in GRID_255:
            best = fit(base.replace(eps=eps / 255), data, checkpoint_dir=f"{tmp}/{eps}",
                       progress=False).best
            rows.append({"n": len(data.train), "norm": base.norm, "batch_size": base.batch_size,
                         "eps_255": eps, "adv_train_loss": round(best["best_train_adv_loss"], 4),
                         "adv_train_acc": round(best["best_train_adv_acc"], 4),
                         "adv_test_loss": round(best["best_test_adv_loss"], 4),
                         "adv_test_acc": round(best["best_test_adv_acc"], 4)})
            print(rows[-1], flush=True)
    with open(OUT, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


if __name__ == "__main__":
    main()
