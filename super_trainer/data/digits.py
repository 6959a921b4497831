"""The digits data set: 1,797 handwritten digits as 8×8 grey images, 10 classes, bundled with scikit-learn
(so it needs no download). Install the extra with ``pip install super-trainer[data]``."""
from __future__ import annotations

import functools
from typing import Tuple

import torch
from torch.utils.data import TensorDataset

from ..registry import DATASETS

__all__ = ["Digits"]

# Mean and standard deviation of all pixels of the data set, after scaling to [0, 1]: fixed, so every split
# is normalized the same way on every machine.
PIXEL_MEAN = 0.3053
PIXEL_STD = 0.3761
SPLITS = ("train", "valid", "test")


@functools.lru_cache(maxsize=1)
def _load() -> Tuple[torch.Tensor, torch.Tensor]:
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise ImportError("the Digits data set needs scikit-learn: pip install super-trainer[data]") from None
    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0  # (N, 1, 8, 8), pixels 0..16
    return (images - PIXEL_MEAN) / PIXEL_STD, torch.tensor(digits.target, dtype=torch.long)


@DATASETS.register("Digits")
class Digits(TensorDataset):
    """The ``split`` ("train", "valid" or "test") of the digits data set: images ``(1, 8, 8)``, normalized,
    and class indices.

    The samples are shuffled once with ``seed`` and cut into valid (``valid_fraction``), test
    (``test_fraction``, may be 0) and train (the rest); the same seed gives the same disjoint splits
    everywhere. ``flatten=True`` gives vectors of 64 features instead of images.
    """

    num_classes = 10
    image_size = 8

    def __init__(self, split: str = "train", valid_fraction: float = 0.2, test_fraction: float = 0.0,
                 seed: int = 0, flatten: bool = False) -> None:
        if split not in SPLITS:
            raise ValueError(f"Digits: split must be one of {list(SPLITS)}, got {split!r}")
        for name, fraction in (("valid_fraction", valid_fraction), ("test_fraction", test_fraction)):
            if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 <= fraction < 1:
                raise ValueError(f"Digits: {name} must be a number in [0, 1), got {fraction!r}")
        if valid_fraction + test_fraction >= 1:
            raise ValueError(f"Digits: valid_fraction + test_fraction must be < 1, got {valid_fraction} + {test_fraction}")
        images, target = _load()
        order = torch.randperm(len(target), generator=torch.Generator().manual_seed(seed))
        n_valid, n_test = round(valid_fraction * len(order)), round(test_fraction * len(order))
        if split == "valid" and n_valid == 0 or split == "test" and n_test == 0:
            raise ValueError(f"Digits: split {split!r} is empty; set {split}_fraction > 0")
        bounds = {"valid": (0, n_valid), "test": (n_valid, n_valid + n_test), "train": (n_valid + n_test, len(order))}
        start, stop = bounds[split]
        chosen = order[start:stop]
        inputs = images[chosen]
        super().__init__(inputs.flatten(1) if flatten else inputs, target[chosen])
        self.split = split
