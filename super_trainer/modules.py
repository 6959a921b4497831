"""What the trainer does to the user's module: unwrap it, convert BatchNorm for DDP, pick what the forward calls.

Checkpoints always hold the user's own module's state_dict, so every wrapper (DDP, DataParallel,
torch.compile) is peeled off by :func:`unwrap_model` before saving or loading.
"""
from __future__ import annotations

import itertools
import logging
from typing import Any, Dict, Mapping

import torch
import torch.nn as nn

__all__ = ["unwrap_model", "is_compiled", "compile_kwargs", "forward_module", "convert_sync_bn"]

logger = logging.getLogger("super_trainer")


def unwrap_model(model: nn.Module) -> nn.Module:
    """The plain module inside DistributedDataParallel / DataParallel / torch.compile wrappers."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        else:
            return model


def move_to(model: nn.Module, device: torch.device) -> nn.Module:
    """``model.to(device)``; on the CPU skipped when every parameter and buffer is there already (``to`` visits
    every module and tensor: ~0.1 ms of a short run). Elsewhere always called: a module may keep other tensors
    (a torchmetrics metric's states) that only its ``_apply`` moves."""
    if device.type == "cpu" and all(t.device.type == "cpu" for t in itertools.chain(model.parameters(),
                                                                                     model.buffers())):
        return model
    return model.to(device)


def is_compiled(model: Any) -> bool:
    """True for what torch.compile(module) returns."""
    return isinstance(getattr(model, "_orig_mod", None), nn.Module)


def compile_kwargs(params: Mapping[str, Any]) -> Dict[str, Any]:
    """torch.compile's arguments from ``torch_compile_options`` and ``torch_compile_mode``."""
    kwargs = dict(params.get("torch_compile_options") or {})
    if params.get("torch_compile_mode") is not None:
        kwargs["mode"] = params["torch_compile_mode"]
    return kwargs


def forward_module(given: nn.Module, net: nn.Module, wrapped: nn.Module, params: Mapping[str, Any]) -> nn.Module:
    """What the training forward calls: ``torch_compile`` compiles ``wrapped`` (net or DDP(net)); a model the user
    passed already compiled stays compiled. Checkpoints keep saving ``net``'s plain state_dict."""
    if params.get("torch_compile"):
        logger.info("torch_compile: compiling the model with %s (the first batches are slow)", compile_kwargs(params))
        return torch.compile(wrapped, **compile_kwargs(params))
    if is_compiled(given) and unwrap_model(given) is net:
        if wrapped is net:
            return given  # the user's own compiled wrapper, options and all
        logger.info("the model was given compiled: compiling its DistributedDataParallel wrapper instead")
        return torch.compile(wrapped)
    return wrapped


def convert_sync_bn(net: nn.Module, params: Mapping[str, Any], is_distributed: bool, device: torch.device) -> nn.Module:
    """``sync_bn``: BatchNorm layers become SyncBatchNorm under DDP (batch statistics over all ranks); on one
    process a no-op with a log line. Returns the module to train (the same one unless it is itself a BatchNorm)."""
    if not params.get("sync_bn"):
        return net
    if not is_distributed:
        logger.info("sync_bn: a single process, so BatchNorm layers stay as they are")
        return net
    if device.type != "cuda":
        raise ValueError("training_params.sync_bn: SyncBatchNorm needs CUDA devices; set sync_bn false on CPU")
    logger.info("sync_bn: converting BatchNorm layers to SyncBatchNorm")
    return nn.SyncBatchNorm.convert_sync_batchnorm(net)
