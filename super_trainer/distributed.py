"""Process-group helpers. Under ``torchrun`` the trainer joins the group; alone, all of these are no-ops."""
from __future__ import annotations

import atexit
import gc
import os
from typing import Dict, Optional

import torch
import torch.distributed as dist

__all__ = ["is_distributed", "rank", "world_size", "is_main_process", "local_rank", "init_from_env",
           "any_rank_true"]


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main_process() -> bool:
    """True on rank 0 (and when not distributed): the process that logs and writes checkpoints."""
    return rank() == 0


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def init_from_env(device: torch.device) -> bool:
    """Join the process group torchrun describes (WORLD_SIZE > 1); returns True when distributed."""
    if is_distributed():
        return True
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend=backend)
    # The group we joined is ours to leave: without this, gloo's threads can still be running while the
    # interpreter exits, and the process aborts ("terminate called without an active exception").
    atexit.register(_leave_process_group)
    return True


def _leave_process_group() -> None:
    if is_distributed():
        # Free the DDP wrappers (they sit in reference cycles) while the interpreter is still whole, so the
        # process group's threads are joined here and not during interpreter teardown, where gloo aborts.
        gc.collect()
        dist.destroy_process_group()
        gc.collect()


def any_rank_true(flag: bool, device: Optional[torch.device] = None) -> bool:
    """True on every rank when ``flag`` is True on any rank (so all ranks agree on stopping)."""
    if not is_distributed():
        return flag
    key = str(device or "cpu")
    tensor = _flag_buffers.get(key)
    if tensor is None:  # called twice per batch under DDP: one buffer per device, not one tensor per call
        tensor = _flag_buffers[key] = torch.zeros(1, device=device or "cpu")
    tensor.fill_(1.0 if flag else 0.0)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return bool(tensor.item())


_flag_buffers: Dict[str, torch.Tensor] = {}

