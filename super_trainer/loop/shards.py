"""``fsdp_params.checkpoint: sharded``: the model, optimizer and EMA of each checkpoint as
``torch.distributed.checkpoint`` shards (one file per rank, never the whole model in one process), for FSDP2 models
too big to gather on one host.

Each checkpoint moment writes ``<run dir>/shards/step_<global_step>/`` (every rank its own shards, a collective,
on the training thread; staged in ``step_<N>.tmp`` and renamed once every rank is done). The ``.pth`` files stay
what they are — ckpt_latest, ckpt_best, ckpt_epoch_N, the top-k files, written by rank 0 in the background — but
hold ``net``, ``optimizer_state_dict`` and ``ema_net`` as None and ``sharded: "shards/step_<N>"`` instead. Several
files of one moment share one shard dir. A shard dir no ``.pth`` on disk names any more is deleted once a newer one
is named (a write in flight always names the newest).
"""
from __future__ import annotations

import logging
import re
import shutil
from pathlib import Path
from typing import Any, Dict, Optional

from ..checkpoint import CheckpointError, read_checkpoint
from ..fsdp import load_sharded_checkpoint, save_sharded_checkpoint
from .parts import RunParts

__all__ = ["ShardStore", "SHARDS"]

logger = logging.getLogger("super_trainer")

SHARDS = "shards"
_STEP = re.compile(r"step_(\d+)$")


class ShardStore:
    """Writes, reads and prunes a run's shard dirs. ``write`` and ``read`` are collectives (every rank)."""

    def __init__(self, ckpt_dir: Path) -> None:
        self.ckpt_dir = ckpt_dir

    def write(self, parts: RunParts, step: int) -> str:
        """This moment's model, optimizer and EMA shards; returns the dir relative to the run dir."""
        name = f"{SHARDS}/step_{step}"
        extra = {"ema": parts.ema.sharded_state_dict()} if parts.ema is not None else None
        save_sharded_checkpoint(self.ckpt_dir / name, parts.net, parts.optimizer, extra)
        return name

    @staticmethod
    def read(parts: RunParts, state: Dict[str, Any], path: Path, with_optimizer: bool) -> None:
        """Load the shards a checkpoint file names into the sharded model, its optimizer and the EMA."""
        if state.get("sharded_net") == "ema":
            raise CheckpointError(f"{path} holds the EMA weights as its net (ckpt_best of an EMA run): with sharded "
                                  "checkpoints resume from ckpt_latest or a save_top_k file")
        directory = path.parent / state["sharded"]
        if not (directory / ".metadata").is_file():
            raise CheckpointError(f"{path} names the shard dir {directory}, which is missing or incomplete")
        # the EMA's own tensors: loaded into in place
        extra = {"ema": parts.ema.sharded_state_dict()} if parts.ema is not None else None
        load_sharded_checkpoint(directory, parts.net, parts.optimizer if with_optimizer else None, extra)

    def prune(self) -> None:
        """Rank 0, once writes landed: delete the shard dirs that no ``.pth`` of the run dir names and that are older
        than the newest named one (a newer dir belongs to a write still in flight)."""
        named = set()
        for file in self.ckpt_dir.glob("*.pth"):
            try:
                named.add(read_checkpoint(file, required_keys=()).get("sharded"))
            except (CheckpointError, OSError):  # not ours, or being replaced: keep everything this time
                return
        steps = [_step(name) for name in named if name]
        if not steps:
            return
        newest = max(steps)
        for directory in (self.ckpt_dir / SHARDS).glob("step_*"):
            step = _step(f"{SHARDS}/{directory.name}")
            if step is not None and step < newest and f"{SHARDS}/{directory.name}" not in named:
                shutil.rmtree(directory, ignore_errors=True)


def _step(name: str) -> Optional[int]:
    found = _STEP.search(name)
    return int(found.group(1)) if found else None
