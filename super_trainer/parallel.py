"""Which data-parallel wrapper trains the model: the user's own DDP, FSDP2 shards, a DDP the trainer makes, or none.

``Trainer.train(model=...)`` under torchrun accepts the model as the user has it:

- plain ``nn.Module``: wrapped in ``DistributedDataParallel`` with the defaults (as in 0.2), or sharded with
  ``fully_shard`` when ``fsdp: true`` (:func:`super_trainer.fsdp.shard_model`);
- already in ``DistributedDataParallel``: that wrapper is kept, with every option it was made with
  (``find_unused_parameters``, ``static_graph``, ``gradient_as_bucket_view``, communication hooks …);
- already sharded with ``fully_shard`` (FSDP2): trained as it is — no DDP around it;
- FSDP1 (``FullyShardedDataParallel``): ValueError (see :func:`super_trainer.fsdp.check_parallel_wrapping`).

Checkpoints always hold the user's own module's state_dict (``unwrap_model``).
"""
from __future__ import annotations

import contextlib
import logging
import warnings
from typing import Any, Callable, ContextManager, Mapping, Optional

import torch
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel

from .distributed import world_size
from .fsdp import check_parallel_wrapping, is_fsdp2, shard_model
from .modules import is_compiled

__all__ = ["users_ddp", "check_given_model", "shard_if_requested", "place_model", "data_parallel_model",
           "gradient_sync"]

logger = logging.getLogger("super_trainer")


def users_ddp(given: nn.Module) -> Optional[DistributedDataParallel]:
    """The DistributedDataParallel the user wrapped the model in (also under torch.compile), or None."""
    model: Any = given._orig_mod if is_compiled(given) else given
    return model if isinstance(model, DistributedDataParallel) else None


def check_given_model(given: nn.Module, device: torch.device, sync_bn: bool = False, fsdp: bool = False) -> None:
    """ValueError, before anything is built, for a wrapped model the trainer cannot keep as it is."""
    check_parallel_wrapping(given, fsdp_requested=fsdp)
    ddp = users_ddp(given)
    if ddp is None:
        return
    if fsdp:
        raise ValueError("training_params.fsdp: the model is given in DistributedDataParallel; pass the plain model "
                         "to shard it with fsdp: true")
    if sync_bn:
        raise ValueError("training_params.sync_bn: the model is given in DistributedDataParallel, so its BatchNorm "
                         "layers cannot be converted any more; convert them before wrapping "
                         "(nn.SyncBatchNorm.convert_sync_batchnorm) and set sync_bn: false")
    where = {p.device for p in ddp.module.parameters()}
    if where and where != {device}:
        raise ValueError(f"model: its DistributedDataParallel wrapper was made on {sorted(map(str, where))} but the "
                         f"Trainer's device is {device}; move the model to {device} before wrapping it, or pass the "
                         "plain model")


def shard_if_requested(net: nn.Module, device: torch.device, params: Mapping[str, Any], distributed: bool
                       ) -> nn.Module:
    """``fsdp: true``: shard ``net`` (on ``device``) with ``fully_shard`` per ``fsdp_params``, before the optimizer
    is built on its parameters. One process has nothing to shard over: the model stays plain (a log line says so),
    so the same recipe runs with and without torchrun."""
    if not params.get("fsdp"):
        return net
    if not distributed:
        warnings.warn("training_params.fsdp: true in a single process (not under torchrun): nothing to shard over, "
                      "the model is trained unsharded and checkpoints hold full state dicts", stacklevel=4)
        return net
    options = params["fsdp_params"]
    sharded = shard_model(net, device, blocks=options["blocks"], reshard_after_forward=options["reshard_after_forward"])
    from torch.distributed.fsdp import FSDPModule  # loaded by shard_model

    blocks = sum(isinstance(module, FSDPModule) for module in sharded.modules()) - 1  # less the root
    logger.info("fsdp: the model is sharded over %d ranks (%d blocks, then the root)", world_size(), blocks)
    return sharded


def place_model(given: nn.Module, net: nn.Module, device: torch.device, params: Mapping[str, Any], distributed: bool,
                train_step: Optional[Callable[..., Any]]) -> nn.Module:
    """What the training forward calls (before torch.compile), once ``net`` is built, sharded and has its
    optimizer: see :func:`data_parallel_model`. A ``train_step`` may run several forwards and backwards per batch,
    which DDP's wrapper cannot follow, so then ``net`` itself is trained and the loop averages the gradients
    (``loop/optimizers.py`` GradientSync). Combinations that would train wrongly are a ValueError naming the key."""
    if is_fsdp2(net):
        if train_step is not None:
            raise ValueError("training_params.train_step: a custom train_step is not supported with an FSDP2 model "
                             "(fsdp: true or fully_shard); train without train_step, or use DDP")
        if params.get("average_best_models"):
            raise ValueError("training_params.average_best_models: not supported with an FSDP2 model (the averaged "
                             "weights would have to be gathered on every rank); set it false")
    if distributed and train_step is not None:
        if users_ddp(given) is not None:
            warnings.warn("model: the given DistributedDataParallel is not used with a train_step (the trainer "
                          "averages the gradients itself, as for a plain model); its options do not apply",
                          stacklevel=4)
        return net
    return data_parallel_model(given, net, device, distributed)


def data_parallel_model(given: nn.Module, net: nn.Module, device: torch.device, distributed: bool) -> nn.Module:
    """What the training forward calls (before torch.compile): the user's own DDP when the model came wrapped,
    ``net`` itself when sharded with FSDP2 or not distributed, else ``DDP(net)`` with the defaults.
    ``net`` is the unwrapped module the trainer trains (``unwrap_model(given)``, moved to ``device``)."""
    ddp = users_ddp(given)
    if ddp is not None:
        if ddp.module is not net:
            raise ValueError("model: the module inside the given DistributedDataParallel was replaced (sync_bn or a "
                             "device move); pass the plain model instead")
        return ddp
    if not distributed or is_fsdp2(net):
        return net
    return DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None)


def gradient_sync(model: nn.Module, sync: bool) -> ContextManager[Any]:
    """Around the forward *and* backward of a micro-batch: when ``sync`` is False (a micro-batch that does not
    step), DDP skips its all-reduce (``no_sync``) so an accumulation window all-reduces once. FSDP2 keeps
    reduce-scattering every micro-batch: its gradients then stay sharded (skipping the sync would hold the full
    unsharded gradients until the step, the memory FSDP is there to save); the sum is the same."""
    if not sync and isinstance(model, DistributedDataParallel):
        return model.no_sync()
    return contextlib.nullcontext()
