"""Shared fixtures: the digits data and a small MLP trained cleanly on it (a fraction of a second).

torch and the learning layer are imported inside the fixtures: this conftest is loaded for every
test module, and the modules that use none of these fixtures should not pay for the imports.
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    import torch
    from torch import nn

    from epsstar.data import DataBundle

# the MLflow store fixture (tracking_store) lives in tests/_store.py
pytest_plugins = ["_store"]


@pytest.fixture(scope="session")
def digits() -> DataBundle:
    from epsstar.config import TrainConfig
    from epsstar.data import load_data

    return load_data(TrainConfig(dataset="digits", augment=False))


def _tensors(dataset) -> tuple[torch.Tensor, torch.Tensor]:
    import torch

    return dataset.batch(torch.arange(len(dataset)), None)


@pytest.fixture(scope="session")
def _trained_mlp(digits: DataBundle) -> nn.Module:
    import torch
    import torch.nn.functional as F

    from epsstar.models import build_model

    torch.manual_seed(0)
    model = build_model(
        "mlp",
        num_classes=10,
        in_channels=1,
        image_size=8,
        width=32,
        mean=digits.mean,
        std=digits.std,
    )
    x, y = _tensors(digits.train)
    opt = torch.optim.Adam(model.parameters(), lr=3e-2)
    for _ in range(40):  # full-batch Adam: ~96% test accuracy
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    opt.zero_grad(set_to_none=True)
    return model.eval()


@pytest.fixture
def trained_mlp(_trained_mlp: nn.Module) -> nn.Module:
    """A fresh copy per test (tests may switch its mode or give it gradients), in eval mode."""
    return copy.deepcopy(_trained_mlp)


@pytest.fixture(scope="session")
def test_batch(digits: DataBundle) -> tuple[torch.Tensor, torch.Tensor]:
    """The first 128 digits test images (128, 1, 8, 8) in [0, 1] and their labels (128,)."""
    x, y = _tensors(digits.eval)
    return x[:128], y[:128]
