"""EMA of an FSDP2-sharded model: each rank averages its own shards (SPEC §4's formula, shard by shard).

An FSDP module cannot be deep-copied, and a full copy would undo the memory FSDP saves, so
:class:`ShardedModelEMA` keeps one local tensor per floating-point state_dict entry — the rank's shard of each
parameter, a copy of each (replicated) float buffer — and blends them with the same ``_foreach`` ops, decay
schedules, ``start_step`` and ``interval`` as :class:`~super_trainer.ema.ModelEMA`. Averaging is elementwise, so
the shards averaged on every rank, put together, are exactly the EMA one process would hold.

Differences from ``ModelEMA`` the trainer must honour:

- there is no ``ema`` module (``ema`` is None): evaluate with ``with ema.evaluation_model(net) as model:``,
  which puts the EMA weights into the sharded model for the block and restores the trained ones after;
- ``state_dict()`` and ``load_state_dict()`` are collectives (every rank calls them at the same point):
  ``state_dict()`` gathers the full tensors onto rank 0's CPU (other ranks get ``{}``) — the plain model's keys,
  so ``ema_net`` loads into an unsharded model; ``load_state_dict()`` reads rank 0's dict and scatters the shards.
"""
from __future__ import annotations

import contextlib
from typing import Any, Dict, Iterator, List, Mapping

import torch
import torch.distributed as dist
import torch.nn as nn

from .ema import ModelEMA
from .modules import unwrap_model

__all__ = ["ShardedModelEMA", "make_ema"]


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """The rank's own part of a DTensor (its storage, not a copy), or the tensor itself."""
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


class ShardedModelEMA(ModelEMA):
    """``ModelEMA`` for a model sharded with ``fully_shard``; see the module docstring."""

    def __init__(self, model: nn.Module, decay: float = 0.9999, decay_type: str = "exp", beta: float = 15.0,
                 start_step: int = 0, interval: int = 1) -> None:
        self._set_schedule(decay, decay_type, beta, start_step, interval)
        self.ema = None  # type: ignore[assignment]  # no module: see evaluation_model
        with torch.no_grad():  # DTensor.clone keeps mesh and placements; int buffers are kept as they are
            self._entries: Dict[str, torch.Tensor] = {
                name: value.detach().clone() for name, value in model.state_dict().items()}
        self._float_names = [name for name, value in self._entries.items() if value.dtype.is_floating_point]
        self._pairs_for: Any = None
        self._ema_floats: List[torch.Tensor] = []
        self._source_floats: List[torch.Tensor] = []

    def _bind(self, model: nn.Module) -> None:
        # The sharded parameters' local tensors are the storage the optimizer updates in place. context.net may be
        # torch.compile's wrapper of the sharded module: its state_dict keys would carry "_orig_mod."
        source = unwrap_model(model).state_dict()
        missing = [name for name in self._float_names if name not in source]
        if missing:
            raise ValueError(f"ShardedModelEMA: the model has no state_dict entries {missing[:3]}; it is not the "
                             "model this EMA was made from")
        self._ema_floats = [_local(self._entries[name]) for name in self._float_names]
        self._source_floats = [_local(source[name]).detach() for name in self._float_names]
        self._pairs_for = model

    @contextlib.contextmanager
    def evaluation_model(self, model: nn.Module) -> Iterator[nn.Module]:
        """``model`` with the EMA weights in its shards for the duration of the block; the trained weights
        come back afterwards, also when the block raises."""
        if self._pairs_for is not model:
            self._bind(model)
        with torch.no_grad():
            trained = [tensor.clone() for tensor in self._source_floats]
            torch._foreach_copy_(self._source_floats, self._ema_floats)
        try:
            yield model
        finally:
            with torch.no_grad():
                torch._foreach_copy_(self._source_floats, trained)

    def sharded_state_dict(self) -> Dict[str, torch.Tensor]:
        """The EMA's own tensors (DTensor shards, replicated buffers) for ``fsdp.save_sharded_checkpoint`` /
        ``load_sharded_checkpoint`` (which load into them in place). Not a copy: do not modify."""
        return self._entries

    @torch.no_grad()
    def state_dict(self) -> Dict[str, Any]:
        """The full EMA weights on rank 0's CPU, ``{}`` on the other ranks. A collective."""
        full = {name: (value.full_tensor() if hasattr(value, "full_tensor") else value).cpu()
                for name, value in self._entries.items()}
        return full if not dist.is_initialized() or dist.get_rank() == 0 else {}

    @torch.no_grad()
    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Take the full EMA weights of rank 0's ``state`` (other ranks' ``state`` is ignored). A collective."""
        from torch.distributed.tensor import DTensor, distribute_tensor

        main = not dist.is_initialized() or dist.get_rank() == 0
        if main:
            unexpected = sorted(set(state) - set(self._entries))
            missing = sorted(set(self._entries) - set(state))
            if unexpected or missing:  # the other ranks then wait in the next collective: torchrun ends them
                raise ValueError(f"ema_net does not fit this model: missing {missing[:3]}, unexpected {unexpected[:3]}")
        for name, entry in self._entries.items():
            if isinstance(entry, DTensor):
                full = state[name].to(entry.device, entry.dtype) if main else torch.empty(
                    entry.shape, dtype=entry.dtype, device=entry.device)
                shard = distribute_tensor(full, entry.device_mesh, entry.placements, src_data_rank=0)
                entry.to_local().copy_(shard.to_local())
            else:
                full = state[name].to(entry.device, entry.dtype) if main else torch.empty_like(entry)
                if dist.is_initialized():
                    dist.broadcast(full, 0)
                entry.copy_(full)


def make_ema(model: nn.Module, **ema_params: Any) -> ModelEMA:
    """``ModelEMA`` for a plain model, ``ShardedModelEMA`` for one sharded with ``fully_shard``."""
    from .fsdp import is_fsdp2

    return ShardedModelEMA(model, **ema_params) if is_fsdp2(model) else ModelEMA(model, **ema_params)
