"""Property tests of the attacks: ε-ball and box, ascent, ε = 0, seeds, no side effects."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from epsstar.attacks import default_step_size, fgm, perturb, pgd, random_delta
from epsstar.config import ConfigError, TrainConfig

# Radii in pixel units that are large enough to matter on 8×8 digits (an L2 radius is the norm of
# the whole 64-pixel image, so it is about √64 = 8 times an L∞ radius of similar strength).
EPS = {"linf": 0.1, "l2": 0.8}
TOL = 1e-5  # float32 slack on the constraints


def _linf(t: torch.Tensor) -> torch.Tensor:
    return t.flatten(1).abs().amax(dim=1)


def _l2(t: torch.Tensor) -> torch.Tensor:
    return t.flatten(1).norm(dim=1)


NORM_OF = {"linf": _linf, "l2": _l2}


def _attack(name: str, model: nn.Module, x, y, norm: str) -> torch.Tensor:
    eps = EPS[norm]
    if name == "fgm":
        return fgm(model, x, y, eps=eps, norm=norm)
    return pgd(model, x, y, eps=eps, norm=norm, steps=10, step_size=default_step_size(eps, 10))


class Exploding(nn.Module):
    """A model whose forward pass must not run."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise AssertionError("forward pass at eps = 0")


class ModeRecorder(nn.Module):
    """Wraps a model and records the ``training`` flag it sees at every forward pass."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.seen: list[bool] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append(self.training)
        return self.inner(x)


def test_default_step_size_is_the_reference_at_8_255_and_scales_with_eps():
    assert math.isclose(default_step_size(8 / 255, 10), 2 / 255)
    assert math.isclose(default_step_size(0.5 / 255, 10), default_step_size(8 / 255, 10) / 16)
    assert math.isclose(default_step_size(8 / 255, 20), 1 / 255)


@pytest.mark.parametrize("attack", ["pgd", "fgm"])
@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_perturbation_stays_in_the_ball_and_the_box(trained_mlp, test_batch, attack, norm):
    x, y = test_batch
    x_adv = _attack(attack, trained_mlp, x, y, norm)
    assert x_adv.shape == x.shape
    assert not x_adv.requires_grad
    assert x_adv.min() >= 0.0 and x_adv.max() <= 1.0
    size = NORM_OF[norm](x_adv - x)
    assert size.max() <= EPS[norm] + TOL
    # The attack really moves: most images get a perturbation near the radius.
    assert (size > 0.5 * EPS[norm]).float().mean() > 0.9


@pytest.mark.parametrize("attack", ["pgd", "fgm"])
@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_adversarial_loss_exceeds_clean_loss(trained_mlp, test_batch, attack, norm):
    x, y = test_batch
    torch.manual_seed(0)
    x_adv = _attack(attack, trained_mlp, x, y, norm)
    with torch.no_grad():
        clean = F.cross_entropy(trained_mlp(x), y, reduction="none")
        adv = F.cross_entropy(trained_mlp(x_adv), y, reduction="none")
    assert adv.mean() > 2 * clean.mean()
    assert (adv >= clean - 1e-4).float().mean() > 0.95


def test_pgd_is_stronger_than_fgm_and_runs_under_no_grad(trained_mlp, test_batch):
    x, y = test_batch
    torch.manual_seed(0)
    with torch.no_grad():  # an evaluation loop may attack inside no_grad
        loss_pgd = F.cross_entropy(trained_mlp(_attack("pgd", trained_mlp, x, y, "linf")), y)
        loss_fgm = F.cross_entropy(trained_mlp(_attack("fgm", trained_mlp, x, y, "linf")), y)
    assert loss_pgd > loss_fgm


@pytest.mark.parametrize("attack", ["pgd", "fgm"])
def test_eps_zero_returns_x_without_a_forward_pass(test_batch, attack):
    x, y = test_batch
    cfg = TrainConfig(eps=0.0, attack=attack)
    assert torch.equal(perturb(Exploding(), x, y, cfg), x)
    assert torch.equal(pgd(Exploding(), x, y, eps=0, norm="l2", steps=5, step_size=0.1), x)


def test_eps_zero_reproduces_clean_accuracy(trained_mlp, test_batch):
    x, y = test_batch
    x_adv = perturb(trained_mlp, x, y, TrainConfig(eps=0.0))
    with torch.no_grad():
        clean_acc = (trained_mlp(x).argmax(1) == y).float().mean()
        adv_acc = (trained_mlp(x_adv).argmax(1) == y).float().mean()
    assert adv_acc == clean_acc > 0.9


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_seed_reproduces_the_attack(trained_mlp, test_batch, norm):
    x, y = test_batch
    runs = []
    for seed in (3, 3, 4):
        torch.manual_seed(seed)
        runs.append(_attack("pgd", trained_mlp, x, y, norm))
    assert torch.equal(runs[0], runs[1])
    assert not torch.equal(runs[0], runs[2])  # the random start does depend on the seed


@pytest.mark.parametrize("train_mode", [True, False])
def test_attack_leaves_parameter_grads_and_mode_alone(trained_mlp, test_batch, train_mode):
    x, y = test_batch
    model = ModeRecorder(trained_mlp).train(train_mode)
    pgd(model, x, y, eps=0.1, norm="linf", steps=3, step_size=0.05)
    assert all(p.grad is None for p in model.parameters())
    assert model.training is train_mode
    assert model.seen == [train_mode] * 3

    # Existing gradients (an optimizer step in progress) are not changed either.
    F.cross_entropy(model(x), y).backward()
    before = [p.grad.clone() for p in model.parameters()]
    pgd(model, x, y, eps=0.1, norm="l2", steps=3, step_size=0.05)
    assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), before, strict=True))


def test_fgsm_is_one_signed_gradient_step(trained_mlp, test_batch):
    x, y = test_batch
    eps = 0.05
    delta = torch.zeros_like(x, requires_grad=True)
    F.cross_entropy(trained_mlp(x + delta), y, reduction="sum").backward()
    expected = (x + eps * delta.grad.sign()).clamp(0, 1)
    assert torch.allclose(fgm(trained_mlp, x, y, eps=eps, norm="linf"), expected, atol=1e-6)


def test_fgm_l2_is_one_normalised_gradient_step(trained_mlp, test_batch):
    x, y = test_batch
    eps = 0.5
    delta = torch.zeros_like(x, requires_grad=True)
    F.cross_entropy(trained_mlp(x + delta), y, reduction="sum").backward()
    g = delta.grad
    expected = (x + eps * g / _l2(g).view(-1, 1, 1, 1)).clamp(0, 1)
    assert torch.allclose(fgm(trained_mlp, x, y, eps=eps, norm="l2"), expected, atol=1e-5)


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_zero_gradient_gives_a_finite_zero_step(test_batch, norm):
    x, y = test_batch
    flat = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    nn.init.zeros_(flat[1].weight)  # logits do not depend on x: the gradient is exactly zero
    x_adv = pgd(flat, x, y, eps=0.1, norm=norm, steps=3, step_size=0.05, random_start=False)
    assert torch.equal(x_adv, x)


def test_l2_random_start_is_uniform_in_the_ball():
    # For a uniform point of the d-ball of radius ε, P(‖δ‖ ≤ tε) = t^d, so the median radius is
    # ε·2^(-1/d). A start that scales a Gaussian by ε, or takes a radius ε·U, fails this.
    torch.manual_seed(0)
    eps, d = 0.5, 4
    delta = random_delta(torch.rand(20_000, 1, 2, 2), eps, "l2")
    radius = _l2(delta)
    assert radius.max() <= eps + TOL
    assert abs(radius.median().item() - eps * 0.5 ** (1 / d)) < 0.01
    assert abs(radius.quantile(0.1).item() - eps * 0.1 ** (1 / d)) < 0.01
    direction = delta.flatten(1) / radius[:, None]
    assert direction.mean(dim=0).abs().max() < 0.03  # no preferred direction


def test_l2_pgd_random_start_lies_in_the_ball(test_batch):
    x, y = test_batch
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    x_adv = pgd(model, x, y, eps=0.3, norm="l2", steps=0, step_size=0.0)
    size = _l2(x_adv - x)
    assert size.max() <= 0.3 + TOL and size.min() > 0


def test_linf_random_start_fills_the_cube():
    torch.manual_seed(0)
    delta = random_delta(torch.rand(2_000, 1, 8, 8), 0.1, "linf")
    assert delta.abs().max() <= 0.1
    assert abs(delta.abs().mean().item() - 0.05) < 0.002  # uniform on [-ε, ε]: E|δ| = ε/2


def test_attack_of_an_example_does_not_depend_on_the_rest_of_the_batch(trained_mlp, test_batch):
    x, y = test_batch
    kw = dict(eps=0.1, norm="l2", steps=5, step_size=0.05, random_start=False)
    alone = pgd(trained_mlp, x[:2], y[:2], **kw)
    together = pgd(trained_mlp, x, y, **kw)[:2]
    assert torch.allclose(alone, together, atol=1e-6)


@pytest.mark.parametrize("attack", ["pgd", "fgm"])
def test_perturb_dispatches_with_the_default_step_size(trained_mlp, test_batch, attack):
    x, y = test_batch
    cfg = TrainConfig(eps=4 / 255, attack=attack, steps=7, norm="linf")
    torch.manual_seed(1)
    got = perturb(trained_mlp, x, y, cfg)
    torch.manual_seed(1)
    if attack == "pgd":
        step = default_step_size(cfg.eps, 7)
        want = pgd(trained_mlp, x, y, eps=cfg.eps, norm="linf", steps=7, step_size=step)
    else:
        want = fgm(trained_mlp, x, y, eps=cfg.eps, norm="linf")
    assert torch.equal(got, want)


def test_unknown_norm_is_a_config_error(trained_mlp, test_batch):
    x, y = test_batch
    with pytest.raises(ConfigError, match="unknown norm 'l1'.*linf, l2"):
        pgd(trained_mlp, x, y, eps=0.1, norm="l1", steps=1, step_size=0.1)
