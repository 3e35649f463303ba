"""Figures shared by the search summary and the report (matplotlib, headless).

Every function takes ε in pixel units and draws it in /255, the unit the paper's figures use.
Callers own the returned figure: save it, then ``plt.close(fig)`` (the report draws dozens).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")  # no display on servers and in CI
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from epsstar.estimate import Estimate  # noqa: E402

Series = Sequence[tuple[float, float]]  # (x, y) points: (epoch, value) or (ε pixel, loss)


def loss_vs_eps_figure(points: Series, threshold: float, estimate: Estimate | None = None, *,
                       clean_train_loss: float | None = None, title: str = "",
                       runs: Series = (),
                       finetune: Mapping[str, tuple[Series, Estimate]] | None = None,
                       unstable_eps: float | None = None) -> Figure:
    """R̂(θ̂(ε), ε) against ε (/255) with R*(0) and ε* marked. ``points`` are (ε pixel, loss).

    Args:
        points: the curve, one point per ε (per-ε means when seeds repeat).
        runs: the individual runs behind ``points`` (ε pixel, loss), drawn as faint dots.
        finetune: label → (fine-tuned points (ε pixel, loss), the extrapolated estimate); each
            estimate is marked where its line meets R*(0).
        unstable_eps: the smallest ε (pixel) at which FGM training overfitted catastrophically.
    """
    fig, ax = plt.subplots(figsize=(6, 4))
    pts = sorted((e * 255, loss) for e, loss in points if e is not None and loss is not None)
    if clean_train_loss is not None:
        pts = [(0.0, clean_train_loss), *pts]
    if runs:
        ax.plot([e * 255 for e, _ in runs], [loss for _, loss in runs], ".", color="C0",
                alpha=0.35, label="single runs (seeds)")
    if pts:
        xs, ys = zip(*pts, strict=True)
        ax.plot(xs, ys, "o-", color="C0", label="adversarial training loss at best epoch")
    ax.axhline(threshold, color="C3", ls="--", label=f"R*(0) = {threshold:.3f}")
    if estimate is not None and estimate.bound is None and math.isfinite(estimate.epsstar):
        ax.axvline(estimate.epsstar * 255, color="C2", ls=":",
                   label=f"eps* = {estimate.epsstar * 255:.3g}/255")
        ax.axvspan(estimate.lower * 255, estimate.upper * 255, color="C2", alpha=0.12)
    for i, (label, (ft_points, ft_estimate)) in enumerate((finetune or {}).items()):
        _draw_finetune(ax, label, ft_points, ft_estimate, threshold, color=f"C{4 + i}")
    if unstable_eps is not None:
        ax.axvline(unstable_eps * 255, color="k", ls="-.", lw=1,
                   label=f"FGM unstable from {unstable_eps * 255:.3g}/255")
    ax.set_xlabel("eps (/255)")
    ax.set_ylabel("adversarial training loss")
    ax.set_title(title or "Phase transition: where adversarial training leaves clean training",
                 fontsize=9)
    ax.legend(fontsize=7, loc="upper left")  # the curve rises to the right; "best" is slow
    # fixed margins, not tight_layout: the layout pass costs as much as drawing (report: dozens)
    fig.subplots_adjust(left=0.11, right=0.97, bottom=0.12, top=0.92)
    return fig


def _draw_finetune(ax, label: str, points: Series, estimate: Estimate, threshold: float, *,
                   color: str) -> None:
    """Fine-tuned points, and an ✕ on the R*(0) line where their extrapolation crosses it."""
    ax.plot([e * 255 for e, _ in points], [loss for _, loss in points], "s", color=color,
            ms=4, label=f"{label} fine-tune")
    if estimate.bound is None and math.isfinite(estimate.epsstar):
        ax.plot([estimate.epsstar * 255], [threshold], "x", color=color, ms=9, mew=2,
                label=f"{label} fine-tune eps* = {estimate.epsstar * 255:.3g}/255")


def learning_curves_figure(curves: Mapping[str, Series], *, gap: Series = (),
                           best_epoch: float | None = None, lr_drop_epoch: float | None = None,
                           title: str = "") -> Figure:
    """One run's per-epoch curves in three panels: losses, accuracies, generalization-gap ratio.

    Args:
        curves: metric name → (epoch, value); names ending in ``_loss`` go to the first panel,
            ``_acc`` to the second (``train*`` solid in C0, ``test*`` dashed in C1, so one
            legend serves both), anything else is not drawn.
        gap: (epoch, (test_adv_loss − train_adv_loss) / train_adv_loss), the third panel.
        best_epoch: the early-stopping epoch, marked in every panel.
        lr_drop_epoch: the first epoch after the learning-rate drop, marked in every panel.
    """
    fig, axes = plt.subplots(1, 3, figsize=(11, 3))
    panels = {"_loss": axes[0], "_acc": axes[1]}
    for name, series in curves.items():
        ax = next((a for suffix, a in panels.items() if name.endswith(suffix)), None)
        if ax is None or not series:
            continue
        test = name.startswith("test")
        xs, ys = zip(*series, strict=True)
        ax.plot(xs, ys, ls="--" if test else "-", color="C1" if test else "C0",
                label="test (PGD)" if test else "train (attacked)")
    if gap:
        xs, ys = zip(*gap, strict=True)
        axes[2].plot(xs, ys, color="C3")
    for ax, name in zip(axes, ("loss", "accuracy", "gap ratio (test - train) / train"),
                        strict=True):
        _mark_epochs(ax, best_epoch, lr_drop_epoch)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("epoch", fontsize=8)
        ax.set_title(name, fontsize=9)
        ax.tick_params(labelsize=7)
    # one legend: the panels share colours and line styles; losses fall, so upper right is free
    axes[0].legend(fontsize=7, loc="upper right")
    fig.suptitle(title, fontsize=10)
    # fixed margins, not tight_layout: the layout pass costs as much as drawing (report: dozens)
    fig.subplots_adjust(left=0.05, right=0.99, bottom=0.16, top=0.82, wspace=0.22)
    return fig


def _mark_epochs(ax, best_epoch: float | None, lr_drop_epoch: float | None) -> None:
    if best_epoch is not None and math.isfinite(best_epoch):
        ax.axvline(best_epoch, color="C2", ls=":", lw=1, label="best epoch")
    if lr_drop_epoch is not None:
        ax.axvline(lr_drop_epoch, color="0.5", ls="-.", lw=1, label="lr drop")
