"""Model registry. Every model takes [0, 1] pixels of shape (B, C, H, W) and returns logits (B, K).

Normalisation is the model's first layer (:class:`Normalize`), never a data transform: attacks
then work in pixel space, so ε and the [0, 1] box mean the same thing for every dataset.

Architectures (``MODELS``):

- ``mlp``: flatten → Linear(d, h) → ReLU → Linear(h, h) → ReLU → Linear(h, K), h = ``width``.
- ``cnn``: the paper's MNIST CNN — two 5×5 convolutions (32 and 64 channels, each followed by
  ReLU and 2×2 max-pooling) and two fully connected layers, the first with h = ``width`` units.
  The channel counts and kernel size are those of the Madry et al. MNIST challenge model, whose
  1024-unit FC layer the paper replaces by h ∈ {16, 128}.
- ``preact_resnet18``: PreActResNet18 as in locuslab/robust_overfitting (``width`` is ignored).
- ``wrn34``: WideResNet-34-k as in locuslab/robust_overfitting, widen factor k = ``width``.

Both ResNets end in adaptive average pooling instead of a fixed ``avg_pool2d(out, 4 or 8)``: on
32×32 inputs the two are identical (the last feature map is 4×4 / 8×8), and on 8×8 or 28×28
inputs the fixed pool would crash or discard pixels.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from epsstar.config import ConfigError


class Normalize(nn.Module):
    """(x − mean) / std per channel; x in [0, 1] pixels, shape (B, C, H, W).

    mean and std are buffers, so they travel with the state dict into checkpoints.
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        if len(mean) != len(std):
            raise ConfigError(f"mean has {len(mean)} channels but std has {len(std)}")
        if min(std) <= 0:
            raise ConfigError(f"std must be > 0 per channel, got {tuple(std)}")
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        return (x - self.mean) / self.std


# ---------------------------------------------------------------------------------------- MLP, CNN


def mlp(*, num_classes: int, in_channels: int, image_size: int, width: int) -> nn.Module:
    """Two hidden layers of ``width`` units with ReLU."""
    d = in_channels * image_size * image_size
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(d, width),
        nn.ReLU(),
        nn.Linear(width, width),
        nn.ReLU(),
        nn.Linear(width, num_classes),
    )


def cnn(*, num_classes: int, in_channels: int, image_size: int, width: int) -> nn.Module:
    """The paper's MNIST CNN: conv(32, 5×5) → pool → conv(64, 5×5) → pool → FC(h) → FC(K)."""
    side = image_size // 2 // 2  # two 2×2 max-pools, floor division as nn.MaxPool2d does
    if side < 1:
        raise ConfigError(f"cnn needs images of at least 4x4 pixels, got {image_size}x{image_size}")
    return nn.Sequential(
        nn.Conv2d(in_channels, 32, kernel_size=5, padding=2),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(32, 64, kernel_size=5, padding=2),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(64 * side * side, width),
        nn.ReLU(),
        nn.Linear(width, num_classes),
    )


# ---------------------------------------------------------------------------------- PreActResNet18


class PreActBlock(nn.Module):
    """BN → ReLU → conv3×3 → BN → ReLU → conv3×3; a 1×1-conv shortcut when the shape changes."""

    def __init__(self, in_planes: int, planes: int, stride: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.shortcut = None
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(x))
        # The projection shortcut sees the pre-activated input, as in the reference code.
        shortcut = x if self.shortcut is None else self.shortcut(out)
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))
        return out + shortcut


class PreActResNet18(nn.Module):
    """PreActResNet18 (He et al. 2016, https://arxiv.org/abs/1603.05027), 64-128-256-512."""

    def __init__(self, num_classes: int, in_channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 64, 3, stride=1, padding=1, bias=False)
        stages, in_planes = [], 64
        for planes, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            blocks = (PreActBlock(in_planes, planes, stride), PreActBlock(planes, planes, 1))
            stages.append(nn.Sequential(*blocks))
            in_planes = planes
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.bn = nn.BatchNorm2d(512)
        self.linear = nn.Linear(512, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        out = self.conv1(x)  # (B, 64, H, W)
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))  # (B, 512, H/8, W/8)
        out = F.relu(self.bn(out))
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)  # (B, 512)
        return self.linear(out)


def preact_resnet18(
    *, num_classes: int, in_channels: int, image_size: int, width: int
) -> nn.Module:
    """PreActResNet18; ``image_size`` and ``width`` do not change it (adaptive pooling)."""
    del image_size, width  # registry signature; the architecture has a fixed width
    return PreActResNet18(num_classes, in_channels)


# ------------------------------------------------------------------------------------ WideResNet-34


class WideResNet(nn.Module):
    """WideResNet-34-k (Zagoruyko & Komodakis 2016, https://arxiv.org/abs/1605.07146)."""

    def __init__(self, num_classes: int, in_channels: int, widen: int) -> None:
        super().__init__()
        n = 5  # blocks per stage: depth 34 = 6n + 4 (three stages of n two-conv blocks + 4)
        channels = (16, 16 * widen, 32 * widen, 64 * widen)
        self.conv1 = nn.Conv2d(in_channels, channels[0], 3, stride=1, padding=1, bias=False)
        stages = []
        for i, stride in enumerate((1, 2, 2)):
            # WideResNet's basic block is the pre-activation block (no dropout)
            blocks = [PreActBlock(channels[i], channels[i + 1], stride)]
            blocks += [PreActBlock(channels[i + 1], channels[i + 1], 1) for _ in range(n - 1)]
            stages.append(nn.Sequential(*blocks))
        self.block1, self.block2, self.block3 = stages
        self.bn = nn.BatchNorm2d(channels[3])
        self.fc = nn.Linear(channels[3], num_classes)
        self._init_weights()

    def _init_weights(self) -> None:
        # The reference initialisation: He-normal (fan-out) convolutions, unit BN, zero FC bias.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        out = self.block3(self.block2(self.block1(self.conv1(x))))  # (B, 64k, H/4, W/4)
        out = F.relu(self.bn(out))
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)  # (B, 64k)
        return self.fc(out)


def wrn34(*, num_classes: int, in_channels: int, image_size: int, width: int) -> nn.Module:
    """WideResNet-34-k with k = ``width`` (the paper uses k = 1 and k = 10)."""
    del image_size  # adaptive pooling: any input size of at least 4x4 works
    return WideResNet(num_classes, in_channels, widen=width)


# ---------------------------------------------------------------------------------------- registry

MODELS: dict[str, Callable[..., nn.Module]] = {
    "mlp": mlp,
    "cnn": cnn,
    "preact_resnet18": preact_resnet18,
    "wrn34": wrn34,
}


def build_model(
    arch: str,
    *,
    num_classes: int,
    in_channels: int,
    image_size: int,
    width: int,
    mean: Sequence[float],
    std: Sequence[float],
) -> nn.Module:
    """Build ``arch`` behind a :class:`Normalize` layer; the result takes [0, 1] pixels.

    Args:
        arch: a key of :data:`MODELS`.
        num_classes: K, the number of logits.
        in_channels, image_size: input shape (B, in_channels, image_size, image_size).
        width: MLP/CNN hidden width h, WideResNet widen factor k (ignored by PreActResNet18).
        mean, std: per-channel statistics in [0, 1] pixel units (``DataBundle.mean/std``).

    Returns:
        ``nn.Sequential(normalize=Normalize(mean, std), net=<arch>)``.

    Example:
        >>> m = build_model("mlp", num_classes=10, in_channels=1, image_size=8, width=32,
        ...                 mean=(0.3,), std=(0.38,))
        >>> m(torch.rand(4, 1, 8, 8)).shape
        torch.Size([4, 10])
    """
    if arch not in MODELS:
        raise ConfigError(f"unknown arch {arch!r}; choose one of: {', '.join(MODELS)}")
    if len(mean) != in_channels:
        raise ConfigError(f"mean has {len(mean)} channels but the images have {in_channels}")
    net = MODELS[arch](
        num_classes=num_classes, in_channels=in_channels, image_size=image_size, width=width
    )
    return nn.Sequential(OrderedDict(normalize=Normalize(mean, std), net=net))
