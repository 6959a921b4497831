"""Iterating loaders: counting batches, flagging the last one, splitting and moving batches to the device,
and the gradient-accumulation window arithmetic (windows, optimizer steps per epoch)."""
from __future__ import annotations

import math
from typing import Any, Dict, Iterator, Mapping, Optional, Tuple

import torch
import torch.nn as nn

__all__ = ["count_batches", "numbered", "window_size", "optimizer_steps_per_epoch", "rescale_grads", "to_device"]


def count_batches(loader: Any, limit: Optional[int]) -> Optional[int]:
    """Batches per pass (capped by ``limit``) when the loader has len(), else None."""
    try:
        n = len(loader)
    except TypeError:
        return None
    return min(n, limit) if limit else n


def numbered(loader: Any, n_batches: Optional[int], limit: Optional[int]) -> Iterator[Tuple[int, Any, bool]]:
    """(batch_idx, batch, is_last), stopping after ``n_batches`` (known length) or ``limit``; looks one
    batch ahead when len() is unknown, so the last batch is flagged either way."""
    if n_batches is not None:
        if n_batches == 0:
            return
        for batch_idx, batch in enumerate(loader):
            yield batch_idx, batch, batch_idx + 1 == n_batches
            if batch_idx + 1 == n_batches:
                return
        return
    iterator = iter(loader)
    try:
        batch = next(iterator)
    except StopIteration:
        return
    batch_idx = 0
    for upcoming in iterator:
        if limit is not None and batch_idx + 1 == limit:
            break
        yield batch_idx, batch, False
        batch, batch_idx = upcoming, batch_idx + 1
    yield batch_idx, batch, True


def window_size(batch_idx: int, n_batches: Optional[int], accumulate: int) -> int:
    """Micro-batches in the accumulation window of ``batch_idx``; windows never span epochs."""
    if accumulate == 1:
        return 1
    if n_batches is None:
        return accumulate  # unknown length: the last partial window is corrected by rescale_grads
    start = batch_idx - batch_idx % accumulate
    return min(accumulate, n_batches - start)


def optimizer_steps_per_epoch(params: Any, train_batches: Optional[int]) -> Optional[int]:
    """Optimizer steps per epoch (L), from len(train_loader) or max_train_batches; ValueError when a
    schedule needs L and neither gives it."""
    batches = train_batches if train_batches is not None else params.max_train_batches
    if batches is not None:
        return max(1, math.ceil(batches / params.batch_accumulate))
    needs = []
    if params.lr_mode in ("cosine", "poly", "exp", "function"):
        needs.append(f"lr_mode {params.lr_mode!r}")
    if params.lr_warmup_epochs and params.warmup_mode == "linear_batch_step" and not params.lr_warmup_steps:
        needs.append("linear_batch_step warmup over lr_warmup_epochs")
    if params.ema and params.ema_params["decay_type"] == "exp":
        needs.append("ema decay_type 'exp'")
    if needs:
        raise ValueError(f"training_params.max_train_batches: {' and '.join(needs)} need the number of batches "
                         "per epoch, but train_loader has no len(); set max_train_batches")
    return None


def rescale_grads(net: nn.Module, factor: float) -> None:
    grads = [p.grad for p in net.parameters() if p.grad is not None]
    if grads:
        torch._foreach_mul_(grads, factor)


def to_device(batch: Any, device: torch.device) -> Tuple[Any, Any, Dict[str, Any]]:
    """Split a batch into (inputs, target, additional items) and move it to ``device``."""
    if type(batch) in (tuple, list) and len(batch) == 2:  # the common case, kept cheap
        inputs, target = batch
        if type(inputs) is torch.Tensor and type(target) is torch.Tensor:
            if device.type == "cpu":  # non_blocking only matters for host-to-GPU copies, and costs a little
                return inputs.to(device), target.to(device), {}
            return inputs.to(device, non_blocking=True), target.to(device, non_blocking=True), {}
    if isinstance(batch, (tuple, list)) and len(batch) in (2, 3):
        inputs, target = move(batch[0], device), move(batch[1], device)
        extras = move(batch[2], device) if len(batch) == 3 else {}
        return inputs, target, extras if isinstance(extras, dict) else {"extra": extras}
    if isinstance(batch, Mapping) and "inputs" in batch and "target" in batch:
        extras = {k: move(v, device) for k, v in batch.items() if k not in ("inputs", "target")}
        return move(batch["inputs"], device), move(batch["target"], device), extras
    raise ValueError("a batch must be (inputs, target), (inputs, target, {extra items}) or "
                     f"{{'inputs': ..., 'target': ...}}; got {type(batch).__name__}"
                     + (f" of length {len(batch)}" if isinstance(batch, (tuple, list)) else ""))


def move(value: Any, device: torch.device) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(device, non_blocking=True)
    if isinstance(value, (list, tuple)):
        return type(value)(move(v, device) for v in value)
    if isinstance(value, dict):
        return {k: move(v, device) for k, v in value.items()}
    return value
