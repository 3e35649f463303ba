"""Model registry: every architecture builds, runs forward/backward, and normalises first."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from epsstar.config import ConfigError
from epsstar.models import MODELS, Normalize, build_model

# (in_channels, image_size): digits, MNIST, CIFAR/SVHN.
SHAPES = [(1, 8), (1, 28), (3, 32)]


def _build(arch: str, channels: int, size: int, width: int, num_classes: int = 10) -> nn.Module:
    return build_model(
        arch,
        num_classes=num_classes,
        in_channels=channels,
        image_size=size,
        width=width,
        mean=(0.5,) * channels,
        std=(0.25,) * channels,
    )


def _forward_backward(model: nn.Module, x: torch.Tensor, num_classes: int) -> None:
    logits = model(x)
    assert logits.shape == (len(x), num_classes)
    assert torch.isfinite(logits).all()
    logits.logsumexp(1).sum().backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("arch", ["mlp", "cnn"])
@pytest.mark.parametrize("channels,size", SHAPES)
def test_small_models_run_on_every_input_shape(arch, channels, size):
    torch.manual_seed(0)
    model = _build(arch, channels, size, width=16, num_classes=7)
    _forward_backward(model, torch.rand(4, channels, size, size), 7)


@pytest.mark.parametrize("arch,width", [("preact_resnet18", 1), ("wrn34", 1)])
@pytest.mark.parametrize("channels,size", [(1, 8), (3, 32)])
def test_resnets_run_on_tiny_and_cifar_images(arch, width, channels, size):
    torch.manual_seed(0)
    model = _build(arch, channels, size, width=width)
    _forward_backward(model.train(), torch.rand(2, channels, size, size), 10)


def test_first_layer_normalises_pixels():
    torch.manual_seed(0)
    model = _build("mlp", 3, 8, width=16)
    assert isinstance(model[0], Normalize)
    x = torch.rand(5, 3, 8, 8)
    assert torch.allclose(model(x), model.net((x - 0.5) / 0.25), atol=1e-6)
    assert {"normalize.mean", "normalize.std"} <= set(model.state_dict())


def test_normalize_uses_per_channel_statistics():
    norm = Normalize((0.1, 0.2, 0.3), (0.5, 1.0, 2.0))
    x = torch.ones(2, 3, 4, 4)
    out = norm(x)
    assert torch.allclose(out[:, 0], torch.full((2, 4, 4), 1.8))
    assert torch.allclose(out[:, 2], torch.full((2, 4, 4), 0.35))


def test_width_is_the_hidden_width_or_widen_factor():
    mlp = _build("mlp", 1, 8, width=24).net
    assert [m.out_features for m in mlp if isinstance(m, nn.Linear)] == [24, 24, 10]
    cnn = _build("cnn", 1, 28, width=128).net
    fcs = [m for m in cnn if isinstance(m, nn.Linear)]
    assert len(fcs) == 2 and fcs[0].out_features == 128
    assert sum(isinstance(m, nn.Conv2d) for m in cnn) == 2
    assert _build("wrn34", 3, 32, width=2).net.fc.in_features == 64 * 2


def test_wrn34_has_five_blocks_per_stage_and_the_reference_size():
    # Depth 34 = 6n + 4 with n = 5 two-convolution blocks per stage (Zagoruyko & Komodakis).
    net = _build("wrn34", 3, 32, width=10).net
    assert [len(stage) for stage in (net.block1, net.block2, net.block3)] == [5, 5, 5]
    convs3 = [m for m in net.modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3)]
    assert len(convs3) == 1 + 3 * 5 * 2
    assert sum(p.numel() for p in net.parameters()) == 46_160_474  # WRN-34-10, 10 classes


def test_unknown_arch_lists_the_choices():
    with pytest.raises(ConfigError, match="unknown arch 'vit'.*" + ", ".join(MODELS)):
        _build("vit", 1, 8, width=8)


def test_mean_must_match_the_channels():
    with pytest.raises(ConfigError, match="mean has 1 channels but the images have 3"):
        build_model(
            "mlp", num_classes=10, in_channels=3, image_size=8, width=8, mean=(0.5,), std=(0.5,)
        )
