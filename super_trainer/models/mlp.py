"""A small multi-layer perceptron, the default recipe's model."""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn

from ..registry import MODELS

__all__ = ["MLP"]


@MODELS.register("MLP")
class MLP(nn.Module):
    """``in_features → hidden… → num_classes`` with ReLU between layers (and optional dropout)."""

    def __init__(self, in_features: int = 64, num_classes: int = 10, hidden: Sequence[int] = (64,),
                 dropout: float = 0.0) -> None:
        super().__init__()
        layers = []
        width = in_features
        for size in hidden:
            layers += [nn.Linear(width, size), nn.ReLU()]
            if dropout:
                layers.append(nn.Dropout(dropout))
            width = size
        layers.append(nn.Linear(width, num_classes))
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x.flatten(1))
