"""Checks of what ``train()`` was given, before any event: each mistake that would otherwise train silently wrong
(a Dataset given as a loader, a list of test loaders, an endless loader, a bad experiment name) is one clear
error or warning naming the thing and the fix."""
from __future__ import annotations

import warnings
from typing import Any, Dict, Mapping, Optional

import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset

from .batches import to_device
from .rng import preserved_rng

__all__ = ["check_experiment_name", "check_loader", "check_test_loaders", "warn_if_unbounded", "sample_target"]


def check_experiment_name(name: Any) -> str:
    """The experiment name, or ValueError when it is not one folder name (``<ckpt_root_dir>/<name>`` must be a
    folder inside the root): empty, ".", or holding a path separator, ".." or a NUL. Called by Trainer.__init__."""
    if not isinstance(name, str):
        raise ValueError(f"experiment_name must be a string (one folder name), got {type(name).__name__}")
    bad = [c for c in ("/", "\\", "\0", "..") if c in name]
    if not name.strip() or name == "." or bad:
        why = f"holds {bad[0]!r}" if bad else "is empty" if not name.strip() else "is '.'"
        raise ValueError(f"experiment_name {name!r} {why}: it must be one folder name inside ckpt_root_dir "
                         "(letters, digits, '-', '_', '.'), e.g. 'resnet18_cifar10'")
    return name


def check_loader(key: str, loader: Any) -> None:
    """ValueError when ``loader`` (the value of ``key``: train_loader, valid_loader, test_loaders[name]) is a
    Dataset instead of a loader: iterating it would train on single unbatched samples."""
    if isinstance(loader, (Dataset, IterableDataset)) and not isinstance(loader, DataLoader):
        raise ValueError(f"{key}: got a {type(loader).__name__} (a Dataset), not a loader of batches; wrap it: "
                         f"DataLoader(dataset, batch_size=..., shuffle={key == 'train_loader'})")


def check_test_loaders(test_loaders: Any) -> Dict[str, Any]:
    """``test_loaders`` as a dict {name: loader} (None: {}); ValueError for a list, tuple or a single loader,
    naming the dict form (the names become the metrics' prefixes)."""
    if test_loaders is None:
        return {}
    if isinstance(test_loaders, Mapping):
        for name, loader in test_loaders.items():
            check_loader(f"test_loaders[{name!r}]", loader)
        return dict(test_loaders)
    kind = type(test_loaders).__name__
    example = "{'test': loader}" if not isinstance(test_loaders, (list, tuple)) else \
        "{" + ", ".join(f"'test_{i}': loader_{i}" for i in range(min(len(test_loaders), 2))) + "}"
    raise ValueError(f"test_loaders must be a dict {{name: loader}}, got a {kind}; give e.g. test_loaders={example} "
                     "(each name prefixes its metrics)")


def warn_if_unbounded(train_batches: Optional[int], params: Mapping[str, Any]) -> None:
    """Warn when the train loader has no len() and nothing bounds an epoch: if it never ends, no epoch ends, so
    validation and checkpoints never happen. ``train_batches`` is ``count_batches(train_loader, ...)``."""
    if train_batches is None and not params.get("max_train_batches") and not params.get("max_steps"):
        warnings.warn("train_loader has no len() and training_params.max_train_batches is not set: if the loader "
                      "never ends (a stream, itertools.cycle), the first epoch never ends and validation and "
                      "checkpoints never happen; set max_train_batches to the batches of one epoch", UserWarning,
                      stacklevel=2)


def sample_target(loader: Any) -> Any:
    """The target of one sample of ``loader``'s map-style dataset, collated as the loader would (a batch of
    one), without touching the loader's iterator, its sampler or the run's RNG; None when the loader has no
    indexable dataset or the sample cannot be read (the loop then checks its first batch instead)."""
    dataset = getattr(loader, "dataset", None)
    if isinstance(dataset, IterableDataset) or not hasattr(dataset, "__getitem__") or not hasattr(dataset, "__len__"):
        return None
    try:
        if len(dataset) == 0:
            return None
        with preserved_rng():  # a random augmentation in __getitem__ must not shift the run's numbers
            batch = loader.collate_fn([dataset[0]]) if callable(getattr(loader, "collate_fn", None)) else dataset[0]
        return to_device(batch, torch.device("cpu"))[1]
    except Exception:  # reading it fails the same way at the first batch, where the error belongs
        return None
