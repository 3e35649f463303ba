"""Training objectives: standard adversarial training (AT), TRADES and MART.

Each objective maps a clean batch x (B, C, H, W) in [0, 1] pixels with labels y (B,) to
``(objective, adv_logits)``: the scalar the optimizer minimises (a batch mean) and the logits
(B, K) on the attacked batch. The training loop logs ``train_objective`` = the objective and
``train_adv_loss`` = cross-entropy of ``adv_logits``, so the adversarial-loss metric means the same
for every objective (for AT the two are equal and are R̂ of SPEC §2).

ε = 0 is clean training for every objective: no attack runs and the objective is the plain
cross-entropy on x (the run's role, "clean", is decided by ε alone). For AT and TRADES this is
exactly their ε → 0 limit. MART's limit is its boosted cross-entropy on x, which differs from
plain cross-entropy by −log(1 − max_{k≠y} p_k(x)); we still train clean at ε = 0 so that every
objective shares one clean reference run and one R*(0).

All attacks here go through :func:`epsstar.attacks.perturb` (one PGD implementation), with a
custom ``loss_fn`` where the objective needs one. The model's train/eval mode is left as the
caller set it, during the attack too (the reference TRADES/MART code switches to eval mode for
the attack; we keep one mode policy, the training loop's, for every objective).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from epsstar.attacks import LossFn, perturb, random_delta
from epsstar.config import ConfigError, TrainConfig

# TRADES' attack maximises KL(p(x) ‖ p(x + δ)), which is flat (zero gradient) at δ = 0, so it
# starts from a small random δ. The reference code uses a fixed 0.001 per pixel; we scale the
# start radius with ε (ε/32 ≈ 0.001 at ε = 8/255) so it is equally "small" at every ε.
TRADES_START = 1 / 32

# MART's boosted term −log(1 − p) is infinite at p = 1; the reference code's offset keeps it finite.
_MART_OFFSET = 1.0001


def _clean(model: nn.Module, x: Tensor, y: Tensor, cfg: TrainConfig) -> tuple[Tensor, Tensor]:
    """ε = 0 for every objective: cross-entropy on the clean batch, no attack."""
    del cfg
    logits = model(x)
    return F.cross_entropy(logits, y), logits


def adversarial_training(
    model: nn.Module, x: Tensor, y: Tensor, cfg: TrainConfig
) -> tuple[Tensor, Tensor]:
    """Madry et al. 2018 (https://arxiv.org/abs/1706.06083): CE on the attacked batch."""
    logits = model(perturb(model, x, y, cfg))
    return F.cross_entropy(logits, y), logits


def _kl_rows(log_p: Tensor, log_q: Tensor) -> Tensor:
    """KL(p ‖ q) per example from log-probabilities (B, K) → (B,)."""
    return (log_p.exp() * (log_p - log_q)).sum(dim=1)


def _kl_to(log_p_clean: Tensor) -> LossFn:
    """Attack loss for TRADES: Σ_batch KL(p(x) ‖ p(x + δ)) with p(x) fixed (computed once)."""

    def loss_fn(logits: Tensor, y: Tensor) -> Tensor:
        del y
        return _kl_rows(log_p_clean, F.log_softmax(logits, dim=1)).sum()

    return loss_fn


def trades(model: nn.Module, x: Tensor, y: Tensor, cfg: TrainConfig) -> tuple[Tensor, Tensor]:
    """TRADES, Zhang et al. 2019 (https://arxiv.org/abs/1901.08573).

    The attack maximises KL(p(x) ‖ p(x_adv)) from a small random start; the objective is
    CE(f(x), y) + β · KL(p(x) ‖ p(x_adv)) averaged over the batch. Returns f(x_adv) as the logits.
    """
    logits = model(x)
    log_p_clean = F.log_softmax(logits, dim=1)
    # p(x) is a constant of the attack: one clean forward serves the attack and the objective.
    attack_loss = _kl_to(log_p_clean.detach())
    start = random_delta(x, cfg.eps * TRADES_START, cfg.norm)
    adv_logits = model(perturb(model, x, y, cfg, loss_fn=attack_loss, delta0=start))
    kl = _kl_rows(log_p_clean, F.log_softmax(adv_logits, dim=1)).mean()
    return F.cross_entropy(logits, y) + cfg.beta * kl, adv_logits


def mart(model: nn.Module, x: Tensor, y: Tensor, cfg: TrainConfig) -> tuple[Tensor, Tensor]:
    """MART, Wang et al. 2020 (https://openreview.net/forum?id=rklOg6EFwS).

    The attack is the run's CE attack. Objective, averaged over the batch:
    BCE(f(x_adv), y) + β · KL(p(x) ‖ p(x_adv)) · (1 − p_y(x)), where the boosted cross-entropy
    BCE = CE − log(1 − max_{k≠y} p_k(x_adv)) also pushes down the strongest wrong class.
    Returns f(x_adv) as the logits.
    """
    x_adv = perturb(model, x, y, cfg)
    logits = model(x)
    adv_logits = model(x_adv)
    log_p_adv = F.log_softmax(adv_logits, dim=1)
    p_adv = log_p_adv.exp()
    # The strongest wrong class: mask the true class out of the argmax.
    wrong = p_adv.scatter(1, y[:, None], -1.0).argmax(dim=1)
    p_wrong = p_adv.gather(1, wrong[:, None]).squeeze(1)
    boosted = F.nll_loss(log_p_adv, y) - torch.log(_MART_OFFSET - p_wrong).mean()
    log_p_clean = F.log_softmax(logits, dim=1)
    p_true = log_p_clean.exp().gather(1, y[:, None]).squeeze(1)
    robust = (_kl_rows(log_p_clean, log_p_adv) * (1.0 - p_true)).mean()
    return boosted + cfg.beta * robust, adv_logits


Objective = Callable[[nn.Module, Tensor, Tensor, TrainConfig], tuple[Tensor, Tensor]]

OBJECTIVES: dict[str, Objective] = {"at": adversarial_training, "trades": trades, "mart": mart}


def training_loss(
    model: nn.Module, x: Tensor, y: Tensor, cfg: TrainConfig
) -> tuple[Tensor, Tensor]:
    """The objective ``cfg.loss`` at ``cfg.eps`` on one batch.

    Args:
        model: the classifier (its train/eval mode is left unchanged).
        x: clean pixels in [0, 1], (B, C, H, W).
        y: labels (B,), int64.
        cfg: uses loss, beta, eps, norm, attack, steps, step_size.

    Returns:
        (objective, adv_logits): the scalar to minimise (batch mean, differentiable w.r.t. the
        parameters) and the logits (B, K) on the attacked batch (on x itself when ε = 0).

    Example:
        >>> objective, logits = training_loss(model, x, y, TrainConfig(eps=2 / 255, loss="trades"))
        >>> objective.backward()
    """
    if cfg.loss not in OBJECTIVES:
        raise ConfigError(f"unknown loss {cfg.loss!r}; choose one of: {', '.join(OBJECTIVES)}")
    objective = _clean if cfg.eps == 0 else OBJECTIVES[cfg.loss]
    return objective(model, x, y, cfg)
