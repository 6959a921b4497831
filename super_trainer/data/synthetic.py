"""A generated classification data set: needs no download, the same for the same seed on every machine."""
from __future__ import annotations

from typing import Tuple

import torch
from torch.utils.data import DataLoader, TensorDataset

from ..registry import DATASETS

__all__ = ["SyntheticClassification", "synthetic_loaders"]


@DATASETS.register("SyntheticClassification")
class SyntheticClassification(TensorDataset):
    """Gaussian clusters around ``num_classes`` random centres in ``num_features`` dimensions.

    ``noise`` controls the overlap between classes (so accuracy is high but not trivially 100%).
    ``split`` picks disjoint samples from the same clusters ("train", "valid" or "test").
    """

    SPLIT_OFFSETS = {"train": 0, "valid": 1, "test": 2}

    def __init__(self, num_samples: int = 2048, num_features: int = 64, num_classes: int = 10,
                 noise: float = 2.5, seed: int = 0, split: str = "train") -> None:
        if split not in self.SPLIT_OFFSETS:
            raise ValueError(f"split must be one of {list(self.SPLIT_OFFSETS)}, got {split!r}")
        centres = torch.randn(num_classes, num_features, generator=torch.Generator().manual_seed(seed))
        sampler = torch.Generator().manual_seed(seed * 7919 + 1 + self.SPLIT_OFFSETS[split])
        target = torch.randint(num_classes, (num_samples,), generator=sampler)
        inputs = centres[target] + noise * torch.randn(num_samples, num_features, generator=sampler)
        super().__init__(inputs, target)
        self.num_features = num_features
        self.num_classes = num_classes


def synthetic_loaders(batch_size: int = 64, num_samples: int = 2048, seed: int = 0,
                      **dataset_params: object) -> Tuple[DataLoader, DataLoader, DataLoader]:
    """(train, valid, test) loaders over SyntheticClassification; train is shuffled."""
    train = SyntheticClassification(num_samples=num_samples, seed=seed, split="train", **dataset_params)
    valid = SyntheticClassification(num_samples=num_samples // 4, seed=seed, split="valid", **dataset_params)
    test = SyntheticClassification(num_samples=num_samples // 4, seed=seed, split="test", **dataset_params)
    return (DataLoader(train, batch_size=batch_size, shuffle=True),
            DataLoader(valid, batch_size=batch_size),
            DataLoader(test, batch_size=batch_size))
