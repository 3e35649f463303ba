"""Attacks in pixel space: PGD and FGM under L∞ or L2.

Conventions shared by every function here:

- ``x`` is a batch of [0, 1] pixels, shape (B, C, H, W); ``y`` its int64 labels, shape (B,).
- ε and step sizes are in pixel units (8/255 ≈ 0.0314). Under L2 the norm is that of the whole
  image (all C·H·W coordinates), as in the paper.
- The result ``x_adv`` satisfies ‖x_adv − x‖ ≤ ε and 0 ≤ x_adv ≤ 1, and is detached.
- Gradients are taken w.r.t. the perturbation only (``torch.autograd.grad(loss, delta)``), so
  no parameter ``.grad`` is created or changed and no weight gradient is computed, and the
  model's train/eval mode is the caller's choice (training attacks in train mode, as the paper's
  base code does; evaluation attacks in eval mode).
- ``loss_fn(logits, y)`` returns a scalar that is a *sum* over the batch, so the ascent direction
  does not depend on the batch size. Default: summed cross-entropy.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from epsstar.config import ConfigError, TrainConfig

LossFn = Callable[[Tensor, Tensor], Tensor]  # (logits (B, K), y (B,)) -> scalar summed over B

# Guards divisions by a zero norm (a zero gradient or a zero perturbation): the result is then a
# zero step / no rescaling instead of NaN.
_TINY = 1e-12


def default_step_size(eps: float, steps: int) -> float:
    """The PGD step size 2.5·ε/k of Madry et al. (https://arxiv.org/abs/1706.06083), pixel units.

    At ε = 8/255 and k = 10 this is the reference 2/255. A fixed 2/255 would be wrong for small ε:
    at ε = 0.5/255 every step would overshoot the ball and be clipped back, so PGD would only
    visit its corners (L∞) or its surface (L2). Scaling with ε keeps the search the same at every
    strength, and 2.5·ε/k lets the iterate cross the whole ball (2ε) with steps to spare.
    """
    return 2.5 * eps / steps


def sum_cross_entropy(logits: Tensor, y: Tensor) -> Tensor:
    """Cross-entropy summed over the batch: logits (B, K), y (B,) → scalar."""
    return F.cross_entropy(logits, y, reduction="sum")


# ----------------------------------------------------------------------------- norm geometry


def _per_example_norm(t: Tensor) -> Tensor:
    """L2 norm of each example of a (B, ...) tensor, shaped (B, 1, ..., 1) for broadcasting."""
    return t.flatten(1).norm(dim=1).view(-1, *([1] * (t.dim() - 1)))


def _linf_random(x: Tensor, eps: float) -> Tensor:
    return torch.empty_like(x).uniform_(-eps, eps)


def _l2_random(x: Tensor, eps: float) -> Tensor:
    # Uniform in the d-dimensional ball: a uniform direction (normalised Gaussian) and a radius
    # eps·U^(1/d). (Scaling a Gaussian by eps without the radius law would not stay in the ball,
    # and eps·U alone would pile points at the centre.)
    direction = torch.randn_like(x)
    direction = direction / _per_example_norm(direction).clamp_min(_TINY)
    d = x[0].numel()
    radius = eps * torch.rand(x.shape[0], device=x.device, dtype=x.dtype).pow(1.0 / d)
    return direction * radius.view(-1, *([1] * (x.dim() - 1)))


def _linf_direction(grad: Tensor) -> Tensor:
    return grad.sign()


def _l2_direction(grad: Tensor) -> Tensor:
    return grad / _per_example_norm(grad).clamp_min(_TINY)


def _linf_constraint(x: Tensor, eps: float) -> Callable[[Tensor], Tensor]:
    # The ε-cube intersected with the box is itself a box, [max(−ε, −x), min(ε, 1 − x)] per
    # coordinate: one clamp is the exact projection onto it (one kernel per step, not three).
    low, high = (-x).clamp_(min=-eps), (1.0 - x).clamp_(max=eps)
    return lambda delta: torch.clamp(delta, low, high)


def _l2_constraint(x: Tensor, eps: float) -> Callable[[Tensor], Tensor]:
    def constrain(delta: Tensor) -> Tensor:
        delta = delta * (eps / _per_example_norm(delta).clamp_min(_TINY)).clamp(max=1.0)
        # Clipping x + δ to [0, 1] only moves coordinates of δ towards 0, so δ stays in the ball.
        return (x + delta).clamp_(0.0, 1.0) - x

    return constrain


@dataclass(frozen=True)
class _Geometry:
    """What an attack needs to know about a norm."""

    random: Callable[[Tensor, float], Tensor]  # a random point of the ε-ball, shaped like x
    direction: Callable[[Tensor], Tensor]  # steepest-ascent direction of unit norm
    # (x, ε) → δ ↦ a point of {‖δ‖ ≤ ε, 0 ≤ x + δ ≤ 1}: the projection onto the ball, then
    # onto the box (exact for L∞; for L2 the standard rescale-then-clip)
    constraint: Callable[[Tensor, float], Callable[[Tensor], Tensor]]


NORM_GEOMETRY: dict[str, _Geometry] = {
    "linf": _Geometry(_linf_random, _linf_direction, _linf_constraint),
    "l2": _Geometry(_l2_random, _l2_direction, _l2_constraint),
}


def _geometry(norm: str) -> _Geometry:
    if norm not in NORM_GEOMETRY:
        raise ConfigError(f"unknown norm {norm!r}; choose one of: {', '.join(NORM_GEOMETRY)}")
    return NORM_GEOMETRY[norm]


def random_delta(x: Tensor, eps: float, norm: str) -> Tensor:
    """A perturbation drawn uniformly from the ε-ball of ``norm``, shape of ``x`` (B, C, H, W)."""
    return _geometry(norm).random(x, eps)


# ------------------------------------------------------------------------------------- attacks


def pgd(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    eps: float,
    norm: str,
    steps: int,
    step_size: float,
    random_start: bool = True,
    loss_fn: LossFn | None = None,
    delta0: Tensor | None = None,
) -> Tensor:
    """Projected gradient ascent on ``loss_fn`` within the ε-ball and the [0, 1] box.

    Madry et al. 2018, "Towards Deep Learning Models Resistant to Adversarial Attacks",
    https://arxiv.org/abs/1706.06083.

    L∞: sign-gradient steps, clamp to [−ε, ε]. L2: steps along the gradient normalised per
    example (a zero gradient gives a zero step), rescaling onto the ball of the whole image.

    Args:
        model: logits = model(x); called as it is (its train/eval mode is left unchanged).
        x: clean pixels in [0, 1], (B, C, H, W).
        y: labels (B,), passed through to ``loss_fn``.
        eps: radius ε in pixel units; 0 returns ``x`` without a forward pass.
        norm: ``"linf"`` or ``"l2"``.
        steps: number of ascent steps k.
        step_size: α in pixel units (see :func:`default_step_size`).
        random_start: start uniformly in the ε-ball (else at x).
        loss_fn: (logits, y) → scalar summed over the batch; default summed cross-entropy.
        delta0: an explicit start perturbation (B, C, H, W); overrides ``random_start``. It is
            projected onto the ball and the box first.

    Returns:
        x_adv (B, C, H, W), detached, with ‖x_adv − x‖ ≤ ε and x_adv ∈ [0, 1].

    Example:
        >>> x_adv = pgd(model, x, y, eps=8 / 255, norm="linf", steps=10, step_size=2 / 255)
    """
    if eps == 0:
        return x.detach()
    geometry = _geometry(norm)
    loss_fn = loss_fn or sum_cross_entropy
    x = x.detach()
    if delta0 is None:
        delta0 = geometry.random(x, eps) if random_start else torch.zeros_like(x)
    constrain = geometry.constraint(x, eps)
    delta = constrain(delta0.detach())
    for _ in range(steps):
        delta.requires_grad_(True)
        # enable_grad: evaluation code may call the attack inside torch.no_grad().
        with torch.enable_grad():
            loss = loss_fn(model(x + delta), y)
        # inputs=delta only: autograd skips every weight-gradient kernel, which is what makes a
        # PGD step cheaper than a training step, and leaves parameter .grad untouched.
        (grad,) = torch.autograd.grad(loss, delta)
        delta = constrain(torch.add(delta.detach(), geometry.direction(grad), alpha=step_size))
    # Clamp once more: x + δ with δ ≤ 1 − x can round to just outside [0, 1].
    return (x + delta).clamp_(0.0, 1.0)


def fgm(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    eps: float,
    norm: str,
    loss_fn: LossFn | None = None,
    delta0: Tensor | None = None,
) -> Tensor:
    """Fast gradient method: one step of size ε from x (FGSM under L∞), box-clipped.

    Goodfellow et al. 2015, "Explaining and Harnessing Adversarial Examples",
    https://arxiv.org/abs/1412.6572 (L∞); under L2 the step is ε times the normalised gradient.
    It is :func:`pgd` with one step of size ε and no random start.

    Args:
        model, x, y, eps, norm, loss_fn: as in :func:`pgd`; x is (B, C, H, W) in [0, 1].
        delta0: optional start perturbation (needed when the loss is flat at x, as TRADES' KL is).

    Returns:
        x_adv (B, C, H, W), detached, inside the ε-ball and [0, 1].

    Example:
        >>> x_adv = fgm(model, x, y, eps=8 / 255, norm="linf")
    """
    return pgd(
        model,
        x,
        y,
        eps=eps,
        norm=norm,
        steps=1,
        step_size=eps,
        random_start=False,
        loss_fn=loss_fn,
        delta0=delta0,
    )


# ------------------------------------------------------------------------------------ dispatch


def _perturb_pgd(model: nn.Module, x: Tensor, y: Tensor, cfg: TrainConfig, **kw) -> Tensor:
    step_size = cfg.step_size or default_step_size(cfg.eps, cfg.steps)
    return pgd(model, x, y, eps=cfg.eps, norm=cfg.norm, steps=cfg.steps, step_size=step_size, **kw)


def _perturb_fgm(model: nn.Module, x: Tensor, y: Tensor, cfg: TrainConfig, **kw) -> Tensor:
    return fgm(model, x, y, eps=cfg.eps, norm=cfg.norm, **kw)


ATTACKS: dict[str, Callable[..., Tensor]] = {"pgd": _perturb_pgd, "fgm": _perturb_fgm}


def perturb(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    cfg: TrainConfig,
    *,
    loss_fn: LossFn | None = None,
    delta0: Tensor | None = None,
) -> Tensor:
    """The attack of a run: ``cfg.attack`` at ``cfg.eps`` under ``cfg.norm``.

    PGD uses ``cfg.steps`` steps of ``cfg.step_size`` (0 → :func:`default_step_size`); FGM one
    step of ε. ε = 0 returns ``x`` with no forward pass. Shapes: x (B, C, H, W) in [0, 1],
    y (B,); returns x_adv (B, C, H, W), detached.

    Example:
        >>> x_adv = perturb(model, x, y, TrainConfig(eps=8 / 255, attack="pgd", steps=10))
    """
    if cfg.attack not in ATTACKS:
        raise ConfigError(f"unknown attack {cfg.attack!r}; choose one of: {', '.join(ATTACKS)}")
    return ATTACKS[cfg.attack](model, x, y, cfg, loss_fn=loss_fn, delta0=delta0)
