"""``resume: auto``: whether a run started by torchrun's elastic agent continues from its checkpoint.

Under ``torchrun --max-restarts N`` a failed worker makes the agent stop and restart every worker of the job with
the same command line. Without help, the restarted job trains from epoch 0 again. With ``resume: auto`` (the
default under the elastic agent) it continues from ``ckpt_latest`` when the workers are a restart.

The agent tells its workers through the environment (``torch.distributed.run``'s documentation):
``TORCHELASTIC_RUN_ID`` (set by the agent, also under ``--standalone``), ``TORCHELASTIC_RESTART_COUNT`` (worker
group restarts so far) and ``TORCHELASTIC_MAX_RESTARTS``. The restart count is per agent (per node): an agent
restarts its healthy workers when another node's worker failed or a node joins without counting a restart of
its own, so on the healthy nodes the count can still be 0. :func:`resume_decision` therefore takes the
largest count over all ranks (one all-reduce), so every rank decides alike.
"""
from __future__ import annotations

import dataclasses
import os
import warnings
from typing import List, Mapping, Optional, Union

import torch
import torch.distributed as dist

from .distributed import collective_device

__all__ = ["AUTO", "normalize_resume", "under_elastic_agent", "restart_count", "ResumeDecision", "resume_decision"]

AUTO = "auto"


def normalize_resume(value: Union[bool, str, None], env: Optional[Mapping[str, str]] = None) -> Union[bool, str]:
    """``training_params.resume``: True, False or "auto" (any case); None (unset) is "auto" under torchrun's
    elastic agent and False otherwise; ValueError for anything else."""
    if value is None:
        return AUTO if under_elastic_agent(env) else False
    if isinstance(value, str) and value.lower() == AUTO:
        return AUTO
    if not isinstance(value, bool):
        raise ValueError(f"training_params.resume: must be true, false or 'auto', got {value!r}")
    return value


def under_elastic_agent(env: Optional[Mapping[str, str]] = None) -> bool:
    """True in a process started by torchrun's elastic agent (``torchrun``, ``python -m torch.distributed.run``)."""
    return "TORCHELASTIC_RUN_ID" in (os.environ if env is None else env)


def restart_count(env: Optional[Mapping[str, str]] = None) -> int:
    """This agent's ``TORCHELASTIC_RESTART_COUNT`` (0 outside the elastic agent)."""
    value = (os.environ if env is None else env).get("TORCHELASTIC_RESTART_COUNT", "0")
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"TORCHELASTIC_RESTART_COUNT must be an int, got {value!r}") from None


@dataclasses.dataclass(frozen=True)
class ResumeDecision:
    """What ``resume`` means for this run. ``resume``: load the checkpoint; ``reason``: one line for the log."""

    resume: bool
    reason: str
    restarts: int = 0  # the largest restart count over the ranks
    ranks_with_checkpoint: Optional[List[int]] = None  # measured only for a restart under "auto"


def _largest_over_ranks(values: List[int]) -> List[int]:
    if not (dist.is_available() and dist.is_initialized()):
        return values
    tensor = torch.tensor(values, dtype=torch.int64, device=collective_device())
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor.tolist()


def _ranks_holding(has_checkpoint: bool) -> List[int]:
    if not (dist.is_available() and dist.is_initialized()):
        return [0] if has_checkpoint else []
    flags = [0] * dist.get_world_size()
    flags[dist.get_rank()] = int(has_checkpoint)
    return [rank for rank, held in enumerate(_largest_over_ranks(flags)) if held]


def resume_decision(resume: Union[bool, str], checkpoint_exists: bool, checkpoint: str = "ckpt_latest.pth",
                    only_rank0_reads: bool = False, env: Optional[Mapping[str, str]] = None) -> ResumeDecision:
    """Decide ``training_params.resume`` for this run; under torchrun every rank must call it at the same point.

    ``True``/``False`` are returned as they are; ``False`` in a worker group the agent restarted also warns (on
    rank 0) that the job starts over.
    ``"auto"``: resume when any rank is a restart (:mod:`elastic <super_trainer.elastic>`'s docstring) and the
    checkpoint exists; a restart before the first checkpoint was written starts fresh. ``checkpoint_exists`` is
    this rank's view of the file: when some ranks see it and others do not (no shared filesystem), every rank
    raises the same ValueError — unless ``only_rank0_reads`` (a loader that reads on rank 0 and broadcasts, as
    :func:`super_trainer.fsdp.load_full_state_dicts` does) and rank 0 has it.
    """
    resume = normalize_resume(resume)
    distributed = dist.is_available() and dist.is_initialized()
    restarts = _largest_over_ranks([restart_count(env)])[0] if resume is not True else restart_count(env)
    if resume is False:
        if not restarts:
            return ResumeDecision(False, "resume: false", restarts)
        why = (f"restart {restarts} of torchrun's elastic agent with resume: false: training starts over from epoch 0 "
               "(set resume: auto to continue from the checkpoint)")
        if not distributed or dist.get_rank() == 0:
            warnings.warn(why, stacklevel=2)
        return ResumeDecision(False, why, restarts)
    if resume is True:
        return ResumeDecision(True, "resume: true", restarts)
    if not restarts:
        return ResumeDecision(False, "resume: auto, and this is not a restart by torchrun's elastic agent", restarts)
    holders = _ranks_holding(checkpoint_exists)
    world = dist.get_world_size() if distributed else 1
    if not holders:
        return ResumeDecision(False, f"resume: auto, restart {restarts}, but no rank finds {checkpoint} (the job "
                                     "failed before its first checkpoint): training starts over", restarts, holders)
    if len(holders) < world and not (only_rank0_reads and 0 in holders):
        missing = sorted(set(range(world)) - set(holders))
        raise ValueError(f"resume: auto: {checkpoint} exists on ranks {holders} but not on ranks {missing}; give every "
                         "node the same checkpoint directory (a shared filesystem) or copy the file there")
    return ResumeDecision(True, f"resume: auto, restart {restarts} of torchrun's elastic agent: resuming from "
                                f"{checkpoint}", restarts, holders)
