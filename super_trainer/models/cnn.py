"""Small convolutional classifiers for images of 8×8 to 32×32 pixels (digits, CIFAR-sized data).

Both take the same core arguments (``in_channels``, ``num_classes``, ``widths``, ``dropout``), so a recipe can
swap ``architecture: SmallCNN`` for ``SmallResNet`` without changing ``arch_params``. Global average pooling
before the classifier makes them independent of the image size.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn

from ..registry import MODELS

__all__ = ["SmallCNN", "SmallResNet"]


def _conv_bn_relu(in_channels: int, out_channels: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False),
                         nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True))


def _check(widths: Sequence[int], dropout: float) -> None:
    if not widths or any(not isinstance(w, int) or w < 1 for w in widths):
        raise ValueError(f"widths must be a non-empty list of channel counts >= 1, got {list(widths)!r}")
    if not 0 <= dropout < 1:
        raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")


@MODELS.register("SmallCNN")
class SmallCNN(nn.Module):
    """One stage per entry of ``widths``: two 3×3 conv-BN-ReLU layers, then 2×2 max pooling between stages;
    global average pooling, dropout and a linear classifier."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10, widths: Sequence[int] = (32, 64),
                 dropout: float = 0.0) -> None:
        super().__init__()
        _check(widths, dropout)
        layers = []
        channels = in_channels
        for i, width in enumerate(widths):
            if i:
                layers.append(nn.MaxPool2d(2, ceil_mode=True))  # ceil: an 8×8 input survives three stages
            layers += [_conv_bn_relu(channels, width), _conv_bn_relu(width, width)]
            channels = width
        self.features = nn.Sequential(*layers)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(dropout),
                                  nn.Linear(channels, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class BasicBlock(nn.Module):
    """Two 3×3 convolutions with a residual connection (a 1×1 projection when the shape changes)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = _conv_bn_relu(in_channels, out_channels, stride)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                                          nn.BatchNorm2d(out_channels))
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.bn2(self.conv2(self.conv1(x))) + self.shortcut(x))


@MODELS.register("SmallResNet")
class SmallResNet(nn.Module):
    """A CIFAR-style ResNet: a 3×3 stem, then one stage per entry of ``widths`` of ``blocks_per_stage``
    basic blocks (each later stage halves the resolution), global average pooling, dropout, a linear
    classifier. The defaults make a ResNet-8 (about 78k parameters)."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10, widths: Sequence[int] = (16, 32, 64),
                 dropout: float = 0.0, blocks_per_stage: int = 1) -> None:
        super().__init__()
        _check(widths, dropout)
        if not isinstance(blocks_per_stage, int) or blocks_per_stage < 1:
            raise ValueError(f"blocks_per_stage must be an int >= 1, got {blocks_per_stage!r}")
        self.stem = _conv_bn_relu(in_channels, widths[0])
        blocks = []
        channels = widths[0]
        for i, width in enumerate(widths):
            for j in range(blocks_per_stage):
                blocks.append(BasicBlock(channels, width, stride=2 if i and not j else 1))
                channels = width
        self.stages = nn.Sequential(*blocks)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(dropout),
                                  nn.Linear(channels, num_classes))
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.stages(self.stem(x)))
