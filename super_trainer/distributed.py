"""Process-group helpers. Under ``torchrun`` the trainer joins the group; alone, all of these are no-ops."""
from __future__ import annotations

import atexit
import gc
import os
import warnings
from typing import Dict, Optional, Tuple

import torch
import torch.distributed as dist

__all__ = ["is_distributed", "rank", "world_size", "is_main_process", "local_rank", "init_from_env",
           "any_rank_true", "RankVote"]


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
    _warn_if_restarts_share_the_store()
    dist.init_process_group(backend=backend)
    # The group we joined is ours to leave: without this, gloo's threads can still be running while the
    # interpreter exits, and the process aborts ("terminate called without an active exception").
    atexit.register(_leave_process_group)
    return True


def _warn_if_restarts_share_the_store() -> None:
    """torch 2.13's elastic agent hands restarted workers the store the failed ones used, without a fresh key
    prefix, so the new process group can read a dead worker's address ("Gloo connectFullMesh failed ...
    Connection refused") and the restart is lost (pytorch issue #135712). A fresh store per restart avoids it."""
    if (int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0")) > 0 and os.environ.get("RANK") == "0"
            and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"):
        warnings.warn("torchrun --max-restarts: set TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 in torchrun's environment, "
                      "or a restarted job may fail to connect its ranks (docs/distributed.md)", stacklevel=3)


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



class RankVote:
    """Agree on several small non-negative ints (flags, reason codes) across ranks with ONE all-reduce (MAX).

    The loop's stop points need more than one fact from every rank — "stop", "Ctrl-C", which stop reason —
    and each extra blocking all-reduce costs a full network round trip (about 0.3 ms on gloo/CPU, more across
    nodes), while a few more int64 elements in the same all-reduce cost nothing measurable
    (``benchmarks/stop_vote.py``). The buffer is allocated once, on ``device`` (CUDA under NCCL).

    ``vote(*values)`` blocks and returns the per-position maximum over ranks. ``start(*values)`` launches the same
    all-reduce without waiting and ``result()`` waits for it, so work that does not depend on the outcome can run
    in between. Alone (not distributed) both return the values as given.
    """

    def __init__(self, size: int, device: Optional[torch.device] = None) -> None:
        if size < 1:
            raise ValueError(f"RankVote size must be >= 1, got {size}")
        self.size = size
        self._buffer = torch.zeros(size, dtype=torch.int64, device=device or "cpu")
        self._work: Optional[dist.Work] = None
        self._values: Tuple[int, ...] = ()

    def _fill(self, values: Tuple[int, ...]) -> None:
        if len(values) != self.size:
            raise ValueError(f"RankVote of size {self.size} got {len(values)} values")
        if self._work is not None:
            raise RuntimeError("RankVote.start was called twice without result() in between")
        self._values = tuple(int(v) for v in values)
        if is_distributed():
            if self.size == 1:
                self._buffer.fill_(self._values[0])
            else:
                self._buffer.copy_(torch.tensor(self._values, dtype=torch.int64), non_blocking=True)

    def vote(self, *values: int) -> Tuple[int, ...]:
        self._fill(values)
        if not is_distributed():
            return self._values
        dist.all_reduce(self._buffer, op=dist.ReduceOp.MAX)
        return tuple(self._buffer.tolist())

    def start(self, *values: int) -> None:
        self._fill(values)
        if is_distributed():
            self._work = dist.all_reduce(self._buffer, op=dist.ReduceOp.MAX, async_op=True)

    def result(self) -> Tuple[int, ...]:
        if self._work is None:
            return self._values
        self._work.wait()
        self._work = None
        return tuple(self._buffer.tolist())
