"""Training objectives: finite at ε > 0, clean cross-entropy at ε = 0, the pieces behave."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from epsstar.attacks import random_delta
from epsstar.config import TrainConfig
from epsstar.losses import OBJECTIVES, training_loss

LOSSES = sorted(OBJECTIVES)


class CountingModel(nn.Module):
    """Counts forward passes of the wrapped model."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.inner(x)


def _kl(logits_p: torch.Tensor, logits_q: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of KL(p ‖ q) for two (B, K) logit tensors."""
    log_p, log_q = F.log_softmax(logits_p, 1), F.log_softmax(logits_q, 1)
    return (log_p.exp() * (log_p - log_q)).sum(1).mean()


@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("norm,eps", [("linf", 8 / 255), ("l2", 0.5)])
def test_objective_is_finite_and_trains_the_parameters(trained_mlp, test_batch, loss, norm, eps):
    x, y = test_batch
    model = trained_mlp.train()
    cfg = TrainConfig(loss=loss, eps=eps, norm=norm, steps=5)
    objective, adv_logits = training_loss(model, x, y, cfg)
    assert objective.dim() == 0 and torch.isfinite(objective)
    assert adv_logits.shape == (len(x), 10)
    assert all(p.grad is None for p in model.parameters())  # the attack left no gradients
    objective.backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)
    assert model.training  # the mode is the caller's


@pytest.mark.parametrize("loss", LOSSES)
def test_adversarial_logits_are_worse_than_clean(trained_mlp, test_batch, loss):
    x, y = test_batch
    torch.manual_seed(0)
    _, adv_logits = training_loss(trained_mlp, x, y, TrainConfig(loss=loss, eps=0.1, steps=5))
    with torch.no_grad():
        clean = F.cross_entropy(trained_mlp(x), y)
    assert F.cross_entropy(adv_logits, y) > clean


@pytest.mark.parametrize("loss", LOSSES)
def test_eps_zero_is_clean_cross_entropy_without_an_attack(trained_mlp, test_batch, loss):
    x, y = test_batch
    model = CountingModel(trained_mlp)
    objective, logits = training_loss(model, x, y, TrainConfig(loss=loss, eps=0.0))
    assert model.calls == 1  # one clean forward pass, no attack
    clean_logits = trained_mlp(x)
    assert torch.equal(logits, clean_logits)
    assert torch.equal(objective, F.cross_entropy(clean_logits, y))


def test_at_objective_is_cross_entropy_of_its_logits(trained_mlp, test_batch):
    x, y = test_batch
    objective, logits = training_loss(trained_mlp, x, y, TrainConfig(loss="at", eps=0.1))
    assert torch.equal(objective, F.cross_entropy(logits, y))


def test_trades_is_clean_ce_plus_beta_kl(trained_mlp, test_batch):
    x, y = test_batch
    clean_logits = trained_mlp(x)
    clean_ce = F.cross_entropy(clean_logits, y)
    cfg = TrainConfig(loss="trades", eps=0.1, beta=6.0, steps=5)
    objective, adv_logits = training_loss(trained_mlp, x, y, cfg)
    kl = _kl(clean_logits, adv_logits)
    assert kl > 0
    assert torch.allclose(objective, clean_ce + 6.0 * kl, atol=1e-5)


def test_trades_attack_increases_the_kl_beyond_random_noise(trained_mlp, test_batch):
    x, y = test_batch
    torch.manual_seed(0)
    cfg = TrainConfig(loss="trades", eps=0.1, steps=10)
    _, adv_logits = training_loss(trained_mlp, x, y, cfg)
    with torch.no_grad():
        clean_logits = trained_mlp(x)
        noisy = (x + random_delta(x, cfg.eps, "linf")).clamp(0, 1)
        kl_noise = _kl(clean_logits, trained_mlp(noisy))
    assert _kl(clean_logits, adv_logits) > 3 * kl_noise


def test_mart_boosted_ce_bounds_plain_ce(trained_mlp, test_batch):
    # With β = 0 MART is its boosted CE = CE − log(1 − max wrong prob) ≥ CE of the same logits.
    x, y = test_batch
    torch.manual_seed(0)
    cfg = TrainConfig(loss="mart", eps=0.1, beta=0.0)
    objective, adv_logits = training_loss(trained_mlp, x, y, cfg)
    probs = adv_logits.softmax(1)
    wrong = probs.scatter(1, y[:, None], 0.0).amax(1)
    expected = F.cross_entropy(adv_logits, y) - torch.log(1.0001 - wrong).mean()
    assert objective > F.cross_entropy(adv_logits, y)
    assert torch.allclose(objective, expected, atol=1e-5)


def test_objectives_reproduce_with_the_seed(trained_mlp, test_batch):
    x, y = test_batch
    for loss in LOSSES:
        values = []
        for _ in range(2):
            torch.manual_seed(7)
            values.append(training_loss(trained_mlp, x, y, TrainConfig(loss=loss, eps=0.1))[0])
        assert torch.equal(values[0], values[1])
