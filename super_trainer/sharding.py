"""Giving every rank its own share of the data (SPEC §8 "Scale").

Training: a user's ``DataLoader`` without a ``DistributedSampler`` is re-created with one
(:func:`shard_train_loader`), so ranks never silently train on the same samples. A ``DistributedSampler`` pads
the last samples so that every rank has the same number of batches, which training needs: each optimizer step
is a collective. :func:`check_same_batch_count` tells the ranks apart *before* the first collective when they
do not (a sampler of the user's own), with one error on every rank.

Evaluation: padding would count a few samples twice (validation under 4 ranks ≠ one process), so evaluation
loaders get an :class:`UnpaddedDistributedSampler` (:func:`shard_eval_loader`): disjoint shares whose union is
the dataset, each sample once. Metric states that are sums (torchmetrics syncs them in ``compute()``) are then
exact; losses must be averaged per *sample* over all ranks (:class:`SampleWeightedMean`), because ranks hold
different numbers of samples and their last batches are smaller.
"""
from __future__ import annotations

import math
import warnings
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
from torch.utils.data import (BatchSampler, DataLoader, DistributedSampler, IterableDataset, RandomSampler, Sampler,
                              SequentialSampler)

from .batches import samples_in
from .distributed import collective_device, is_distributed, world_size
from .distributed import rank as current_rank

__all__ = ["shard_loaders", "shard_train_loader", "shard_eval_loader", "UnpaddedDistributedSampler",
           "set_sampler_epoch",
           "gather_counts", "check_same_batch_count", "SampleWeightedMean", "batch_size_of", "equalized_batches",
           "per_rank_share", "shared_seed"]


class UnpaddedDistributedSampler(Sampler[int]):
    """Rank ``r`` of ``W`` reads samples ``r, r + W, r + 2W, …`` (in order): disjoint shares, no duplicates, the
    union is the whole dataset. Shares differ by at most one sample — fine for evaluation (no collective per
    batch), not for training (use ``DistributedSampler``)."""

    def __init__(self, dataset: Any, num_replicas: Optional[int] = None, rank: Optional[int] = None) -> None:
        self.num_replicas = world_size() if num_replicas is None else num_replicas
        self.rank = current_rank() if rank is None else rank
        if not 0 <= self.rank < self.num_replicas:
            raise ValueError(f"UnpaddedDistributedSampler: rank {self.rank} is not in [0, {self.num_replicas})")
        self.dataset_size = len(dataset)

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, self.dataset_size, self.num_replicas))

    def __len__(self) -> int:
        return len(range(self.rank, self.dataset_size, self.num_replicas))

    def set_epoch(self, epoch: int) -> None:  # the order does not depend on the epoch
        pass


def _already_sharded(sampler: Any) -> bool:
    """A DistributedSampler, or a sampler of the user's own that is rank-aware in the same way."""
    return isinstance(sampler, DistributedSampler) or (hasattr(sampler, "num_replicas") and hasattr(sampler, "rank"))


def _plain_order(loader: DataLoader, name: str) -> Tuple[bool, int, bool]:
    """``(shuffle, batch_size, drop_last)`` of a loader whose order super_trainer can reproduce per rank."""
    sampler, batch_size, drop_last = loader.sampler, loader.batch_size, loader.drop_last
    if batch_size is None:  # batch_sampler=...: only torch's own BatchSampler can be rebuilt
        batch_sampler = loader.batch_sampler
        if type(batch_sampler) is not BatchSampler:
            raise ValueError(f"{name}: its batch_sampler {type(batch_sampler).__name__} cannot be sharded across ranks "
                             "by super_trainer; make it rank-aware (or use a DistributedSampler) and set "
                             "training_params.distributed_sampler: false")
        sampler, batch_size, drop_last = batch_sampler.sampler, batch_sampler.batch_size, batch_sampler.drop_last
    if type(sampler) is SequentialSampler:
        return False, batch_size, drop_last
    if type(sampler) is RandomSampler and not sampler.replacement and sampler.num_samples == len(sampler.data_source):
        return True, batch_size, drop_last
    raise ValueError(f"{name}: its sampler {type(sampler).__name__} cannot be sharded across ranks by super_trainer "
                     "(only shuffle=True/False can); make it rank-aware (e.g. wrap the indices it draws in a "
                     "DistributedSampler) and set training_params.distributed_sampler: false")


def _recreated(loader: DataLoader, sampler: Sampler, batch_size: int, drop_last: bool) -> DataLoader:
    """The same loader with ``sampler``: every DataLoader argument except the sampling is carried over."""
    kwargs: Dict[str, Any] = dict(
        batch_size=batch_size, sampler=sampler, num_workers=loader.num_workers, collate_fn=loader.collate_fn,
        pin_memory=loader.pin_memory, drop_last=drop_last, timeout=loader.timeout,
        worker_init_fn=loader.worker_init_fn, multiprocessing_context=loader.multiprocessing_context,
        generator=loader.generator, persistent_workers=loader.persistent_workers,
        pin_memory_device=loader.pin_memory_device, in_order=getattr(loader, "in_order", True))
    if loader.num_workers > 0:
        kwargs["prefetch_factor"] = loader.prefetch_factor
    return DataLoader(loader.dataset, **kwargs)


def shared_seed(seed: Optional[int]) -> int:
    """``seed``, or (None) one drawn on rank 0 and broadcast: a DistributedSampler needs the same seed everywhere."""
    if seed is not None:
        return int(seed)
    drawn = torch.randint(0, 2**31 - 1, (1,), dtype=torch.int64).to(collective_device())
    if is_distributed():
        dist.broadcast(drawn, 0)
    return int(drawn.item())


def _shardable(loader: Any, name: str, enabled: bool) -> bool:
    """Whether ``loader`` is a plain DataLoader this rank should re-create; warns for what cannot be sharded."""
    if not enabled or not is_distributed() or loader is None:
        return False
    if not isinstance(loader, DataLoader):
        warnings.warn(f"{name} is a {type(loader).__name__}, not a DataLoader: every rank iterates all of it. Shard it "
                      "yourself (e.g. by torch.distributed.get_rank()) and set training_params.distributed_sampler: "
                      "false to silence this", stacklevel=3)
        return False
    if isinstance(loader.dataset, IterableDataset):
        warnings.warn(f"{name} reads an IterableDataset, which has no sampler to shard: make sure it yields a "
                      "different share on every rank, and set training_params.distributed_sampler: false to "
                      "silence this", stacklevel=3)
        return False
    if _already_sharded(loader.sampler) or _already_sharded(getattr(loader.batch_sampler, "sampler", None)):
        return False
    if type(loader) is not DataLoader:
        raise ValueError(f"{name} is a {type(loader).__name__} (a DataLoader subclass) without a DistributedSampler; "
                         "super_trainer cannot re-create it: give it a DistributedSampler, or set "
                         "training_params.distributed_sampler: false if it already gives each rank its own share")
    return True


def shard_train_loader(loader: Any, name: str = "train_loader", seed: Optional[int] = None,
                       enabled: bool = True) -> Any:
    """Under torchrun, ``loader`` re-created with a ``DistributedSampler`` (and a warning naming it) when it has
    none; otherwise ``loader`` itself. Keeps batch size, shuffle, drop_last, collate_fn, workers, pin_memory,
    persistent_workers, worker_init_fn, generator. The sampler shuffles with ``seed`` (training_params.seed; one
    seed shared by the ranks when None) and must get ``set_epoch(epoch)`` each epoch (:func:`set_sampler_epoch`).
    ``enabled=False`` is ``distributed_sampler: false``."""
    if not _shardable(loader, name, enabled):
        return loader
    shuffle, batch_size, drop_last = _plain_order(loader, name)
    sampler = DistributedSampler(loader.dataset, shuffle=shuffle, seed=shared_seed(seed))
    warnings.warn(f"{name} has no DistributedSampler: re-created with one (shuffle={shuffle}) so that each of the "
                  f"{world_size()} ranks trains on its own share; set training_params.distributed_sampler: false to "
                  "use it as given", stacklevel=2)
    return _recreated(loader, sampler, batch_size, drop_last)


def shard_eval_loader(loader: Any, name: str = "valid_loader", enabled: bool = True) -> Any:
    """Under torchrun, an evaluation loader re-created with an :class:`UnpaddedDistributedSampler`: without one
    every rank would evaluate everything; with a ``DistributedSampler`` that pads (dataset size not a multiple of
    the world size) the duplicates would be counted, so it is replaced, with a warning naming the loader. A
    loader that cannot be re-created is evaluated whole on every rank (sums and means stay right, the work is
    repeated), with a warning."""
    if not enabled or not is_distributed() or loader is None:
        return loader
    sampler = getattr(loader, "sampler", None)
    if isinstance(sampler, UnpaddedDistributedSampler):
        return loader
    try:
        if isinstance(sampler, DistributedSampler) and type(loader) is DataLoader:
            if len(loader.dataset) % sampler.num_replicas == 0:
                return loader  # nothing padded: the shares are already disjoint and cover the dataset
            warnings.warn(f"{name}: its DistributedSampler pads the last rank's share with repeated samples (or drops "
                          "some); replaced by an unpadded one so that every sample counts once in the metrics",
                          stacklevel=2)
            batch_size, drop_last = loader.batch_size, loader.drop_last
        elif _shardable(loader, name, enabled):
            _, batch_size, drop_last = _plain_order(loader, name)
        else:
            return loader
    except ValueError as err:
        warnings.warn(f"{err}; until then {name} is evaluated whole on every rank", stacklevel=2)
        return loader
    return _recreated(loader, UnpaddedDistributedSampler(loader.dataset), batch_size, drop_last)


def shard_loaders(train: Any, valid: Any, tests: Dict[str, Any], seed: Optional[int], enabled: bool
                  ) -> Tuple[Any, Any, Dict[str, Any]]:
    """Under torchrun, the run's loaders as each rank reads them: the train loader with a seeded DistributedSampler
    (:func:`shard_train_loader`), the evaluation loaders with disjoint unpadded shares (:func:`shard_eval_loader`).
    Alone, or with ``enabled=False`` (``distributed_sampler: false``), the loaders as given."""
    if not enabled or not is_distributed():
        return train, valid, tests
    return (shard_train_loader(train, "train_loader", seed), shard_eval_loader(valid, "valid_loader"),
            {name: shard_eval_loader(loader, f"test_loaders[{name!r}]") for name, loader in tests.items()})


def set_sampler_epoch(loader: Any, epoch: int) -> None:
    """``set_epoch(epoch)`` on the loader's sampler (or its batch sampler's) when it has one: a new shuffle
    per epoch, the same on every rank. Call it before the epoch's iterator is created."""
    for sampler in (getattr(loader, "sampler", None), getattr(getattr(loader, "batch_sampler", None), "sampler", None)):
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)
            return


def gather_counts(count: Optional[int]) -> List[Optional[int]]:
    """Every rank's ``count`` (None: unknown), in rank order; one all-gather. ``[count]`` alone."""
    if not is_distributed():
        return [count]
    mine = torch.tensor([-1 if count is None else int(count)], dtype=torch.int64, device=collective_device())
    counts = [torch.zeros_like(mine) for _ in range(world_size())]
    dist.all_gather(counts, mine)
    return [None if c.item() < 0 else int(c.item()) for c in counts]


def check_same_batch_count(count: Optional[int], name: str = "train_loader") -> None:
    """Raise the same ValueError on every rank when the ranks would run different numbers of train batches this
    epoch (gloo would fail later with "Received data size doesn't match expected size", NCCL would hang). Every
    rank calls it at the same point, before the epoch's first batch. ``count``: the batches this rank will run
    (after max_train_batches), None when the loader has no len()."""
    counts = gather_counts(count)
    if len(set(counts)) > 1:
        per_rank = ", ".join(f"rank {r}: {'unknown' if c is None else c}" for r, c in enumerate(counts))
        raise ValueError(f"{name}: the ranks have different numbers of batches per epoch ({per_rank}); every rank "
                         "must run as many (each optimizer step is a collective). Use a DistributedSampler (it pads "
                         "every rank to the same count), or cap them with training_params.max_train_batches")


def batch_size_of(inputs: Any) -> int:
    """The number of samples in a batch's inputs: the first dimension of its (first) tensor."""
    found = samples_in(inputs)
    if found is None:
        raise ValueError(f"cannot tell the batch size of inputs of type {type(inputs).__name__}")
    return found


class SampleWeightedMean:
    """Mean of per-batch loss items weighted by the batch's sample count, over every rank (SuperGradients'
    ``loss_avg_meter.update(items, len(inputs))``). With unpadded evaluation shares this equals one process's
    value; an unweighted mean of batch means would not (the ranks' batches are cut differently)."""

    def __init__(self) -> None:
        self._items: List[Tuple[torch.Tensor, int]] = []

    def reset(self) -> None:
        self._items = []

    def add(self, items: torch.Tensor, batch_size: int) -> None:
        """One batch's detached loss items (0-d or ``(K,)``) and its number of samples; no host sync."""
        self._items.append((items, batch_size))

    def average(self, components: Optional[int] = None) -> List[float]:
        """The weighted mean per component; one all-reduce when distributed (every rank must call it, also one
        with no batches: pass ``components`` then, the number of loss items). ``[]`` when no rank had a batch."""
        width = self._items[0][0].numel() if self._items else components
        if width is None:
            raise ValueError("SampleWeightedMean.average: no batches on this rank; pass components=")
        device = self._items[0][0].device if self._items else collective_device()
        packed = torch.zeros(width + 1, dtype=torch.float64, device=device)
        if self._items:
            rows = torch.stack([items.reshape(-1) for items, _ in self._items]).to(torch.float64)
            sizes = torch.tensor([size for _, size in self._items], dtype=torch.float64, device=device)
            packed[:-1] = (rows * sizes[:, None]).sum(dim=0)
            packed[-1] = sizes.sum()
        if is_distributed():
            dist.all_reduce(packed)
        total, count = packed[:-1], packed[-1]
        return [] if count.item() == 0 else (total / count).tolist()


def equalized_batches(batches: Iterator[Tuple[int, Any, bool]], counts: Sequence[Optional[int]]
                      ) -> Iterator[Tuple[int, Any, bool]]:
    """For evaluating an FSDP model, whose forward is a collective: ``(batch_idx, batch, counted)`` where this
    rank's batches are followed by ``max(counts) - own`` repeats of its last batch with ``counted=False`` (run
    the forward, count nothing), so every rank runs as many forwards. ``counts``: :func:`gather_counts`."""
    sizes = [c or 0 for c in counts]
    most, own = max(sizes), sizes[current_rank()]
    if min(sizes) == 0 < most:  # raised on every rank alike, before any forward
        empty = [r for r, c in enumerate(sizes) if c == 0]
        raise ValueError(f"ranks {empty} have no evaluation batch while others have up to {most}: an FSDP forward "
                         "needs every rank (use a smaller batch size, or fewer ranks than samples)")
    last = None
    for batch_idx, batch, _ in batches:
        last = batch
        yield batch_idx, batch, True
    for extra in range(most - own):
        yield own + extra, last, False


def per_rank_share(dataset_size: int, ranks: int, batch_size: int, drop_last: bool = False) -> List[int]:
    """Batches each rank gets from an :class:`UnpaddedDistributedSampler` (arithmetic, no collective)."""
    rounding = math.floor if drop_last else math.ceil
    return [rounding(len(range(r, dataset_size, ranks)) / batch_size) for r in range(ranks)]
