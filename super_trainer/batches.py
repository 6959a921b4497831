"""Iterating loaders: counting batches, flagging the last one, splitting batches and moving them to the device
(SPEC §8 "Batches"), calling the model on its inputs, and the gradient-accumulation window arithmetic (windows,
optimizer steps per epoch)."""
from __future__ import annotations

import math
from typing import Any, Callable, Dict, Iterable, Iterator, Mapping, Optional, Tuple

import torch

__all__ = ["count_batches", "numbered", "window_size", "optimizer_steps_per_epoch", "rescale_grads", "to_device",
           "BatchReader", "LABEL_KEYS", "call_model", "metric_preds", "describe_batch"]


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


def rescale_grads(params: Iterable[torch.Tensor], factor: float) -> None:
    grads = [p.grad for p in params if p.grad is not None]
    if grads:
        torch._foreach_mul_(grads, factor)


#: The keys a dict batch's target is read from, in this order (Hugging Face's "labels" first).
LABEL_KEYS = ("labels", "label", "target", "targets")

_ADAPTER_HINT = ("give training_params.batch_adapter, a callable batch -> (inputs, target) or "
                 "(inputs, target, extras_dict)")


class BatchReader:
    """Splits each batch into ``(inputs, target, additional_batch_items)`` and moves it to the device (SPEC §8):

    - ``(x, y)`` → x, y; ``(x, y, d)`` with ``d`` a dict → SuperGradients' convention (``d``: the extra items);
    - a dict (Hugging Face style) → inputs = the dict without its label key, target = its first key of
      :data:`LABEL_KEYS`; with ``keep_labels`` (the model computes its own loss) the inputs keep the labels. A dict
      whose only other key is ``"inputs"`` (0.2's form) gives that value as the inputs;
    - any other shape raises ValueError naming it and ``batch_adapter``: nothing is guessed.

    ``adapter`` (``training_params.batch_adapter``) turns each batch into ``(inputs, target)`` or
    ``(inputs, target, extras_dict)`` first. The plain ``(tensor, tensor)`` batch takes a short path.
    """

    def __init__(self, device: torch.device, adapter: Optional[Callable[[Any], Any]] = None,
                 keep_labels: bool = False) -> None:
        self.device = device
        self.adapter = adapter
        self.keep_labels = keep_labels
        self.non_blocking = device.type != "cpu"  # only host-to-GPU copies gain from it, and it costs a little
        self.on_cpu = device.type == "cpu"
        self.plain = adapter is None

    def __call__(self, batch: Any) -> Tuple[Any, Any, Dict[str, Any]]:
        if self.plain and type(batch) in (tuple, list) and len(batch) == 2:  # the common case, kept cheap
            inputs, target = batch
            if type(inputs) is torch.Tensor and type(target) is torch.Tensor:
                if self.on_cpu and inputs.is_cpu and target.is_cpu:  # what .to() would return, without its cost
                    return inputs, target, {}
                if self.non_blocking:
                    return inputs.to(self.device, non_blocking=True), target.to(self.device, non_blocking=True), {}
                return inputs.to(self.device), target.to(self.device), {}
        inputs, target, extras = self.split(batch)
        return move(inputs, self.device), move(target, self.device), move(extras, self.device)

    def split(self, batch: Any) -> Tuple[Any, Any, Dict[str, Any]]:
        """(inputs, target, extras) of ``batch``, on the device it came on."""
        if self.adapter is not None:
            return _adapted(self.adapter(batch), batch)
        if isinstance(batch, (tuple, list)):
            if len(batch) == 2:
                return batch[0], batch[1], {}
            if len(batch) == 3 and isinstance(batch[2], Mapping):
                return batch[0], batch[1], dict(batch[2])
        elif isinstance(batch, Mapping):
            return self._split_dict(batch)
        raise ValueError(f"training_params.batch_adapter: cannot tell inputs from target in a batch of "
                         f"{describe_batch(batch)} (the trainer reads (inputs, target), (inputs, target, "
                         f"{{extras}}) or a dict with a label key); {_ADAPTER_HINT}")

    def _split_dict(self, batch: Mapping) -> Tuple[Any, Any, Dict[str, Any]]:
        label = next((key for key in LABEL_KEYS if key in batch), None)
        if label is None:
            if self.keep_labels:  # the model computes its own loss from what it gets; nothing to compare with
                return dict(batch), None, {}
            raise ValueError(f"training_params.batch_adapter: a dict batch needs a label key ("
                             f"{', '.join(map(repr, LABEL_KEYS))}); got {describe_batch(batch)}; {_ADAPTER_HINT}")
        if not self.keep_labels and set(batch) == {"inputs", label}:
            return batch["inputs"], batch[label], {}
        inputs = dict(batch) if self.keep_labels else {k: v for k, v in batch.items() if k != label}
        return inputs, batch[label], {}


def _adapted(out: Any, batch: Any) -> Tuple[Any, Any, Dict[str, Any]]:
    if isinstance(out, (tuple, list)) and len(out) in (2, 3) and (len(out) == 2 or isinstance(out[2], Mapping)):
        return out[0], out[1], dict(out[2]) if len(out) == 3 else {}
    raise ValueError(f"training_params.batch_adapter must return (inputs, target) or (inputs, target, extras_dict); "
                     f"for a batch of {describe_batch(batch)} it returned {describe_batch(out)}")


def describe_batch(batch: Any, depth: int = 0) -> str:
    """A short description of a batch's shape: ``tuple of 3 (Tensor[8, 3], Tensor[8], list of 8)``."""
    if isinstance(batch, torch.Tensor):
        return f"Tensor{list(batch.shape)}"
    if isinstance(batch, Mapping):
        keys = list(batch)
        return f"dict with keys {keys[:8]}" + (" ..." if len(keys) > 8 else "")
    if isinstance(batch, (tuple, list)):
        inner = "" if depth else " (" + ", ".join(describe_batch(b, depth + 1) for b in list(batch)[:5]) + ")"
        return f"{type(batch).__name__} of {len(batch)}{inner}"
    return type(batch).__name__


def to_device(batch: Any, device: torch.device) -> Tuple[Any, Any, Dict[str, Any]]:
    """Split a batch by the rules of :class:`BatchReader` (no adapter) and move it to ``device``."""
    return BatchReader(device)(batch)


def move(value: Any, device: torch.device) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(device, non_blocking=True)
    if isinstance(value, (list, tuple)):
        return type(value)(move(v, device) for v in value)
    if isinstance(value, Mapping):
        return {k: move(v, device) for k, v in value.items()}
    return value


def call_model(model: Any, inputs: Any) -> Any:
    """The model on a batch's inputs: ``model(**inputs)`` for a dict (keyword arguments), else ``model(inputs)``."""
    if type(inputs) is not torch.Tensor and isinstance(inputs, Mapping):
        return model(**inputs)
    return model(inputs)


def metric_preds(preds: Any) -> Any:
    """What metrics are updated with: the model's output, or its ``logits`` for an output object that carries
    them (a Hugging Face ``ModelOutput``)."""
    if type(preds) is torch.Tensor or isinstance(preds, (tuple, list)):
        return preds
    if isinstance(preds, Mapping):
        return preds["logits"] if "logits" in preds else preds
    logits = getattr(preds, "logits", None)
    return logits if logits is not None else preds


def samples_in(*parts: Any) -> Optional[int]:
    """The number of samples in a batch: the first dimension of the first tensor found in ``parts`` (inputs,
    then target; through dicts, lists and tuples); None when there is none (the batch then counts as one)."""
    for part in parts:
        if isinstance(part, torch.Tensor):
            return int(part.shape[0]) if part.dim() else 1
        values = part.values() if isinstance(part, Mapping) else part if isinstance(part, (list, tuple)) else ()
        found = samples_in(*values)
        if found is not None:
            return found
    return None

