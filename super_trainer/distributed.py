"""Process-group helpers. Under ``torchrun`` the trainer joins the group; alone, all of these are no-ops."""
from __future__ import annotations

import atexit
import gc
import os
import warnings
from typing import Any, Dict, Optional, Tuple

import torch
import torch.distributed as dist

__all__ = ["is_distributed", "rank", "world_size", "is_main_process", "local_rank", "init_from_env",
           "any_rank_true", "RankVote", "collective_device"]


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main_process() -> bool:
    """True on rank 0 (and when not distributed): the process that logs and writes checkpoints."""
    return rank() == 0


def collective_device() -> torch.device:
    """Where a tensor for a collective must live: the current CUDA device under NCCL, else the CPU (gloo)."""
    if is_distributed() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


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



def gather_to_main(obj: Any) -> Optional[List[Any]]:
    """Every rank's ``obj`` (picklable; tensors on the CPU), in rank order, on rank 0; None on the others.
    ``[obj]`` alone. Every rank must call it at the same point."""
    if not is_distributed():
        return [obj]
    gathered: Optional[List[Any]] = [None] * world_size() if is_main_process() else None
    dist.gather_object(obj, gathered, dst=0)
    return gathered


def all_gather(obj: Any) -> List[Any]:
    """Every rank's ``obj`` (small and picklable), in rank order, on every rank; ``[obj]`` alone."""
    if not is_distributed():
        return [obj]
    gathered: List[Any] = [None] * world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


class RankVote:
    """Agree on several flags (stop, Ctrl-C, one flag per stop reason …) across ranks with ONE all-reduce of
    ONE element: each flag comes back True when it is True on any rank.

    Every blocking all-reduce is a network round trip (about 0.25 ms on gloo/CPU here, more across nodes) and the
    loop's stop points need more than one fact from every rank. On gloo an all-reduce of 3+ elements also costs
    more than one of 1-2 (about 0.4 vs 0.25 ms: another algorithm), so the flags travel as the bits of one int64
    reduced with bitwise OR. NCCL has no bitwise reduction; there the flags travel as one byte each, reduced with
    MAX, in the same single kernel (``benchmarks/stop_vote.py``). The buffer is allocated once, on ``device``.

    ``vote(*flags)`` blocks. ``start(*flags)`` launches the same all-reduce without waiting and ``result()``
    waits for it, so work that does not depend on the outcome can run in between. Alone (not distributed) both
    return the flags as given.
    """

    def __init__(self, size: int, device: Optional[torch.device] = None) -> None:
        if not 1 <= size <= 63:
            raise ValueError(f"RankVote size must be in [1, 63], got {size}")
        self.size = size
        self.device = torch.device(device or "cpu")
        self._buffer: Optional[torch.Tensor] = None
        self._bits = True  # one int64 of bits, reduced with BOR; per-flag bytes with MAX under NCCL
        self._work: Optional[dist.Work] = None
        self._flags: Tuple[bool, ...] = ()

    def _fill(self, flags: Tuple[Any, ...]) -> None:
        if len(flags) != self.size:
            raise ValueError(f"RankVote of size {self.size} got {len(flags)} flags")
        if self._work is not None:
            raise RuntimeError("RankVote.start was called twice without result() in between")
        self._flags = tuple(bool(f) for f in flags)
        if not is_distributed():
            return
        if self._buffer is None:
            self._bits = dist.get_backend() != "nccl"
            self._buffer = torch.zeros(1 if self._bits else self.size, dtype=torch.int64 if self._bits else torch.uint8,
                                       device=self.device)
        if self._bits:
            self._buffer.fill_(sum(1 << i for i, flag in enumerate(self._flags) if flag))
        else:
            self._buffer.copy_(torch.tensor(self._flags, dtype=torch.uint8), non_blocking=True)

    def _op(self) -> Any:
        return dist.ReduceOp.BOR if self._bits else dist.ReduceOp.MAX

    def _read(self) -> Tuple[bool, ...]:
        assert self._buffer is not None
        if self._bits:
            bits = int(self._buffer.item())
            return tuple(bool(bits >> i & 1) for i in range(self.size))
        return tuple(bool(v) for v in self._buffer.tolist())

    def vote(self, *flags: Any) -> Tuple[bool, ...]:
        self._fill(flags)
        if not is_distributed():
            return self._flags
        dist.all_reduce(self._buffer, op=self._op())
        return self._read()

    def start(self, *flags: Any) -> None:
        self._fill(flags)
        if is_distributed():
            self._work = dist.all_reduce(self._buffer, op=self._op(), async_op=True)

    def result(self) -> Tuple[bool, ...]:
        if self._work is None:
            return self._flags
        self._work.wait()
        self._work = None
        return self._read()
