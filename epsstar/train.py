"""The one training loop: clean (ε = 0), adversarial from scratch, and fine-tuning all run here.

It knows nothing about MLflow: the caller passes an ``on_epoch`` hook (the tracking layer logs
there). Every epoch ends with an atomic checkpoint (``last.pt``, and ``best.pt`` when the
early-stopping metric improved), so a killed run resumes from its last finished epoch.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from epsstar.attacks import perturb
from epsstar.checkpoint import load_checkpoint, save_checkpoint
from epsstar.config import EpsstarError, TrainConfig
from epsstar.data import DataBundle, make_loader, unaugmented
from epsstar.losses import training_loss
from epsstar.models import build_model

EpochHook = Callable[[int, dict[str, float]], None]


class TrainingDiverged(EpsstarError, FloatingPointError):
    """A loss became NaN or infinite: the run ends FAILED with this one-line reason."""


@dataclass
class FitResult:
    """What a finished fit leaves: the per-epoch history and the early-stopping summary."""

    history: list[dict[str, float]]  # one row per epoch (1-based "epoch" key)
    best: dict[str, float]  # the contract's final metrics (best_epoch, best_train_adv_loss, ...)
    checkpoint_dir: Path
    model: nn.Module = field(repr=False)  # holds the *best* weights after fit returns


# --------------------------------------------------------------------------- set-up
def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def configure_cpu_threads(device: torch.device, data: DataBundle) -> None:
    """One intra-op thread for tiny inputs on the CPU.

    For an 8×8 MLP the work per operator is microseconds, so OpenMP's thread hand-off costs more
    than it saves (measured: 1.5 ms vs up to 150 ms per PGD step on a busy 2-core machine).
    Larger images keep torch's default.
    """
    if device.type == "cpu" and data.in_channels * data.image_size**2 <= 1024:
        torch.set_num_threads(1)


def make_model(cfg: TrainConfig, data: DataBundle) -> nn.Module:
    return build_model(
        cfg.arch, num_classes=data.num_classes, in_channels=data.in_channels,
        image_size=data.image_size, width=cfg.width, mean=data.mean, std=data.std,
    )


def make_optimizer(cfg: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    if cfg.optimizer == "adam":
        return torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                           weight_decay=cfg.weight_decay)


def lr_factor(schedule: str, progress: float) -> float:
    """Learning-rate multiplier at ``progress`` ∈ [0, 1) of training (updated every batch, as in
    the reference code, so the drops land at 50 % and 75 % whatever the epoch count).

    - piecewise: 1, then /10 at 50 % and /100 at 75 % (epochs 100 and 150 of 200);
    - triangular: linear rise to the peak at 40 % then linear fall to 0 (fine-tuning, SPEC §5:
      starting at the clean model's full lr would throw away the clean optimum it starts from);
    - constant: 1.
    """
    if schedule == "piecewise":
        return 1.0 if progress < 0.5 else 0.1 if progress < 0.75 else 0.01
    if schedule == "triangular":
        peak = 0.4
        # floor on the way up so the very first batch does not run at lr = 0
        return max(progress / peak, 1e-3) if progress < peak else (1 - progress) / (1 - peak)
    return 1.0


def make_scheduler(cfg: TrainConfig, optimizer: torch.optim.Optimizer,
                   steps_per_epoch: int) -> torch.optim.lr_scheduler.LambdaLR:
    total = max(1, cfg.epochs * steps_per_epoch)
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(cfg.schedule, min(step / total, 1.0)))


# --------------------------------------------------------------------------- one epoch
def train_epoch(model: nn.Module, loader, optimizer, scheduler, cfg: TrainConfig,
                device: torch.device) -> dict[str, float]:
    """One pass over the training set. Returns the running averages over the epoch's
    minibatches (SPEC §2: R̂ is the loss on each attacked batch *as it was trained on*)."""
    model.train()
    loss_sum = obj_sum = correct = count = 0.0
    for x, y in loader:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        objective, adv_logits = training_loss(model, x, y, cfg)
        optimizer.zero_grad(set_to_none=True)
        objective.backward()
        optimizer.step()
        scheduler.step()
        with torch.no_grad():
            n = y.numel()
            loss_sum += F.cross_entropy(adv_logits, y, reduction="sum").item()
            obj_sum += objective.item() * n
            correct += (adv_logits.argmax(1) == y).sum().item()
            count += n
    return {"train_adv_loss": loss_sum / count, "train_adv_acc": correct / count,
            "train_objective": obj_sum / count}


def evaluate(model: nn.Module, loader, cfg: TrainConfig, device: torch.device, *,
             adversarial: bool) -> tuple[float, float]:
    """Mean cross-entropy and accuracy in eval mode, on clean or PGD-attacked inputs.

    The evaluation attack is always PGD (cfg.steps steps) whatever the training attack, so an
    FGM-trained model's catastrophic overfitting shows up as a collapsed adversarial accuracy.
    """
    model.eval()
    attack_cfg = cfg.replace(attack="pgd")
    loss_sum = correct = count = 0.0
    for x, y in loader:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        if adversarial and cfg.eps > 0:
            x = perturb(model, x, y, attack_cfg)
        with torch.no_grad():
            logits = model(x)
            loss_sum += F.cross_entropy(logits, y, reduction="sum").item()
            correct += (logits.argmax(1) == y).sum().item()
            count += y.numel()
    return loss_sum / count, correct / count


def _eval_epoch(model, eval_loader, cfg, device) -> dict[str, float]:
    clean_loss, clean_acc = evaluate(model, eval_loader, cfg, device, adversarial=False)
    if cfg.eps > 0:
        adv_loss, adv_acc = evaluate(model, eval_loader, cfg, device, adversarial=True)
    else:  # ε = 0: the attacked test set is the test set
        adv_loss, adv_acc = clean_loss, clean_acc
    return {"test_clean_loss": clean_loss, "test_clean_acc": clean_acc,
            "test_adv_loss": adv_loss, "test_adv_acc": adv_acc}


def selection_key(cfg: TrainConfig) -> str:
    """Early stopping: smallest adversarial test loss (clean test loss when ε = 0)."""
    return "test_adv_loss" if cfg.eps > 0 else "test_clean_loss"


# --------------------------------------------------------------------------- the loop
def fit(
    cfg: TrainConfig,
    data: DataBundle,
    *,
    checkpoint_dir: str | Path,
    init_weights: dict[str, torch.Tensor] | None = None,
    resume: bool = True,
    on_epoch: EpochHook | None = None,
    progress: bool | None = None,
    extra_state: dict[str, Any] | None = None,
) -> FitResult:
    """Train ``cfg`` on ``data``; resume from ``checkpoint_dir/last.pt`` when it exists.

    Args:
        init_weights: model state dict to start from (fine-tuning); ignored when resuming.
        on_epoch: called after every epoch (and its checkpoint) with (epoch, metrics).
        progress: tqdm bar over epochs; None = only when attached to a terminal.
        extra_state: small plain values stored in every checkpoint (e.g. the MLflow run id).
    """
    device = resolve_device(cfg.device)
    configure_cpu_threads(device, data)
    checkpoint_dir = Path(checkpoint_dir)
    torch.manual_seed(cfg.seed)  # the initial weights are part of what the seed fixes
    model = make_model(cfg, data).to(device)
    optimizer = make_optimizer(cfg, model)
    steps_per_epoch = len(make_loader(data.train, cfg.batch_size, shuffle=True, seed=cfg.seed))
    scheduler = make_scheduler(cfg, optimizer, steps_per_epoch)
    eval_loader = make_loader(data.eval, max(cfg.batch_size, 256), shuffle=False, seed=0)

    history: list[dict[str, float]] = []
    best: dict[str, float] = {}
    start = 1
    last_path = checkpoint_dir / "last.pt"
    if resume and last_path.exists():
        state = load_checkpoint(last_path, map_location=device)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        history, best, start = list(state["history"]), dict(state["best"]), state["epoch"] + 1
    elif init_weights is not None:
        model.load_state_dict(init_weights)

    key = selection_key(cfg)
    bar = tqdm(range(start, cfg.epochs + 1), desc=f"eps={cfg.eps_255:g}/255", unit="epoch",
               disable=None if progress is None else not progress, initial=start - 1,
               total=cfg.epochs)
    for epoch in bar:
        t0 = time.perf_counter()
        epoch_seed = cfg.seed * 100_003 + epoch  # per epoch, so a resumed run draws the same
        torch.manual_seed(epoch_seed)  # attack random starts
        loader = make_loader(data.train, cfg.batch_size, shuffle=True, seed=epoch_seed,
                             workers=cfg.loader_workers)
        lr = optimizer.param_groups[0]["lr"]
        row = {"epoch": epoch, **train_epoch(model, loader, optimizer, scheduler, cfg, device)}
        row.update(_eval_epoch(model, eval_loader, cfg, device), lr=lr,
                   seconds=time.perf_counter() - t0)
        _check_finite(row, epoch)
        history.append(row)
        improved = not best or row[key] < best[f"best_{key}"]
        if improved:
            best = _best_summary(row)
            save_checkpoint(_state(cfg, model, epoch, history, best, extra_state),
                            checkpoint_dir / "best.pt")
        save_checkpoint(_state(cfg, model, epoch, history, best, extra_state, optimizer,
                               scheduler), last_path)
        bar.set_postfix(loss=f"{row['train_adv_loss']:.3f}", test=f"{row[key]:.3f}")
        if on_epoch is not None:
            on_epoch(epoch, {k: v for k, v in row.items() if k not in ("epoch", "seconds")})

    best_state = load_checkpoint(checkpoint_dir / "best.pt", map_location=device)
    model.load_state_dict(best_state["model"])
    best["train_seconds"] = sum(r["seconds"] for r in history)
    best["best_train_eval_loss"] = train_eval_loss(model, data, cfg, device)
    return FitResult(history=history, best=best, checkpoint_dir=checkpoint_dir, model=model)


def train_eval_loss(model: nn.Module, data: DataBundle, cfg: TrainConfig,
                    device: torch.device) -> float:
    """Eval-mode re-evaluation of the (attacked) training set, logged beside the train-mode
    running average that defines R̂ (SPEC §2), for users who want the cleaner number."""
    loader = make_loader(unaugmented(data.train), max(cfg.batch_size, 256), shuffle=False,
                         seed=0)
    loss, _ = evaluate(model, loader, cfg, device, adversarial=True)
    return loss


def _best_summary(row: dict[str, float]) -> dict[str, float]:
    return {
        "best_epoch": row["epoch"],
        "best_train_adv_loss": row["train_adv_loss"],
        "best_train_adv_acc": row["train_adv_acc"],
        "best_test_adv_loss": row["test_adv_loss"],
        "best_test_clean_loss": row["test_clean_loss"],
        "best_test_adv_acc": row["test_adv_acc"],
        "best_test_clean_acc": row["test_clean_acc"],
    }


def _check_finite(row: dict[str, float], epoch: int) -> None:
    bad = [k for k, v in row.items() if not math.isfinite(v)]
    if bad:
        raise TrainingDiverged(f"training diverged at epoch {epoch}: {', '.join(bad)} not "
                                 "finite (lower --lr?)")


def _state(cfg, model, epoch, history, best, extra, optimizer=None, scheduler=None) -> dict:
    state: dict[str, Any] = {
        "epoch": epoch, "config": cfg.to_params(), "model": model.state_dict(),
        "history": history, "best": best, **(extra or {}),
    }
    if optimizer is not None:
        state["optimizer"] = optimizer.state_dict()
        state["scheduler"] = scheduler.state_dict()
    return state
