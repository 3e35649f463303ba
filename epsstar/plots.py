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
        curves: metric name → (epoch, value); ``train*``/``test*`` names ending in ``_loss`` go
            to the first panel, in ``_acc`` to the second (train solid, test dashed, in the same
            colours in both, so one legend serves both); anything else is not drawn.
        gap: (epoch, (test_adv_loss − train_adv_loss) / train_adv_loss), the third panel.
        best_epoch: the early-stopping epoch, marked in every panel.
        lr_drop_epoch: the first epoch after the learning-rate drop, marked in every panel.
    """
    return LearningCurves().draw(curves, gap=gap, best_epoch=best_epoch,
                                 lr_drop_epoch=lr_drop_epoch, title=title)


class LearningCurves:
    """The figure of :func:`learning_curves_figure`, built once and redrawn for each run: a
    report draws dozens, and building axes, ticks and legend costs more than drawing lines."""

    PANELS = ("loss", "accuracy", "gap ratio (test - train) / train")
    SPLITS = {"train": ("-", "C0", "train (attacked)"), "test": ("--", "C1", "test (PGD)")}

    def __init__(self) -> None:
        self.fig, self.axes = plt.subplots(1, 3, figsize=(11, 3))
        self.lines = {}  # (split, metric suffix) → line; ("gap", "") → the gap-ratio line
        for ax, suffix in zip(self.axes[:2], ("_loss", "_acc"), strict=True):
            for split, (style, color, label) in self.SPLITS.items():
                self.lines[split, suffix] = ax.plot([], [], ls=style, color=color,
                                                    label=label)[0]
        self.lines["gap", ""] = self.axes[2].plot([], [], color="C3")[0]
        self.marks = [(ax.axvline(0, color="C2", ls=":", lw=1, label="best epoch"),
                       ax.axvline(0, color="0.5", ls="-.", lw=1, label="lr drop"))
                      for ax in self.axes]
        for ax, name in zip(self.axes, self.PANELS, strict=True):
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.set_xlabel("epoch", fontsize=8)
            ax.set_title(name, fontsize=9)
            ax.tick_params(labelsize=7)
        # losses fall, so the upper right corner is free
        self.axes[0].legend(fontsize=7, loc="upper right")
        self.title = self.fig.suptitle("", fontsize=10)
        # fixed margins, not tight_layout: the layout pass costs as much as drawing
        self.fig.subplots_adjust(left=0.05, right=0.99, bottom=0.16, top=0.82, wspace=0.22)

    def draw(self, curves: Mapping[str, Series], *, gap: Series = (),
             best_epoch: float | None = None, lr_drop_epoch: float | None = None,
             title: str = "") -> Figure:
        """Show one run (arguments as in :func:`learning_curves_figure`); returns the figure."""
        data: dict[tuple[str, str], Series] = {("gap", ""): gap}
        for name, series in curves.items():
            split = next((s for s in self.SPLITS if name.startswith(s)), None)
            suffix = next((s for s in ("_loss", "_acc") if name.endswith(s)), None)
            if split and suffix:
                data[split, suffix] = series
        for key, line in self.lines.items():
            points = data.get(key, ())
            line.set_data([x for x, _ in points], [y for _, y in points])
        for best, drop in self.marks:
            _move_mark(best, best_epoch)
            _move_mark(drop, lr_drop_epoch)
        for ax in self.axes:
            ax.relim(visible_only=True)
            ax.autoscale_view()
        self.title.set_text(title)
        return self.fig


def _move_mark(line, epoch: float | None) -> None:
    """Move a vertical marker to ``epoch``, or hide it (None / NaN)."""
    visible = epoch is not None and math.isfinite(epoch)
    line.set_visible(visible)
    if visible:
        line.set_xdata([epoch, epoch])
