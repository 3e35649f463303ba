"""Figures shared by the search summary and the report (matplotlib, headless)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import matplotlib

matplotlib.use("Agg")  # no display on servers and in CI
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from epsstar.estimate import Estimate  # noqa: E402


def loss_vs_eps_figure(points: Sequence[tuple[float, float]], threshold: float,
                       estimate: Estimate | None = None, *, clean_train_loss: float | None = None,
                       title: str = "") -> Figure:
    """R̂(θ̂(ε), ε) against ε (/255) with R*(0) and ε* marked. ``points`` are (ε pixel, loss)."""
    fig, ax = plt.subplots(figsize=(6, 4))
    pts = sorted((e * 255, loss) for e, loss in points if e is not None and loss is not None)
    if clean_train_loss is not None:
        pts = [(0.0, clean_train_loss), *pts]
    if pts:
        xs, ys = zip(*pts, strict=True)
        ax.plot(xs, ys, "o-", color="C0", label="adversarial training loss at best epoch")
    ax.axhline(threshold, color="C3", ls="--", label=f"R*(0) = {threshold:.3f}")
    if estimate is not None and estimate.bound is None and math.isfinite(estimate.epsstar):
        ax.axvline(estimate.epsstar * 255, color="C2", ls=":",
                   label=f"eps* = {estimate.epsstar * 255:.3g}/255")
        ax.axvspan(estimate.lower * 255, estimate.upper * 255, color="C2", alpha=0.12)
    ax.set_xlabel("eps (/255)")
    ax.set_ylabel("adversarial training loss")
    ax.set_title(title or "Phase transition: where adversarial training leaves clean training")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig
