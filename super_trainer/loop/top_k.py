"""``save_top_k`` (SPEC §8 "Checkpoint management"): the k best checkpoints by ``metric_to_watch``, each a full
resumable checkpoint named after its epoch (0-based, as ``history`` and ``best_epoch``), its step when the validation
ran inside an epoch, and its value::

    ckpt_top_epoch_3_Accuracy_0.9375.pth
    ckpt_top_epoch_0_step_40_CrossEntropyLoss_0.412346.pth

A value enters the k best only when it is strictly better than the worst kept one (an equal value keeps the older
file). The kept list is stored in every checkpoint (``top_k``), so a resumed run continues it; a file leaving the list
is deleted once the checkpoint that replaces it is on disk.
"""
from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

__all__ = ["TopK", "TOP_PREFIX", "top_file_name"]

TOP_PREFIX = "ckpt_top_epoch_"


def top_file_name(epoch: int, step: Optional[int], metric: str, value: float) -> str:
    """The file name of a top-k checkpoint (``step`` only for a validation inside an epoch)."""
    where = f"{epoch}_step_{step}" if step is not None else f"{epoch}"
    return f"{TOP_PREFIX}{where}_{re.sub(r'[^A-Za-z0-9._-]+', '-', metric)}_{value:.6g}.pth"


class TopK:
    """Which validations' checkpoints are among the k best; the names to write and to delete."""

    def __init__(self, k: Optional[int], metric: str, greater: bool, directory: Path,
                 kept: Sequence[Dict[str, Any]] = ()) -> None:
        self.k, self.metric, self.greater, self.directory = k, metric, greater, directory
        # a resume into another run dir (resume_path, a 0.2 experiment) starts with the files that are here
        self.kept: List[Dict[str, Any]] = [dict(e) for e in kept if (directory / e["file"]).is_file()]
        known = {e["file"] for e in self.kept}
        # files of a timeline a resume rolled back (a resume from an earlier checkpoint of this run): replaced
        self.untracked = [p.name for p in directory.glob(f"{TOP_PREFIX}*.pth") if p.name not in known] \
            if k and directory.is_dir() else []

    def offer(self, value: Any, epoch: int, step: Optional[int]) -> Optional[Tuple[str, List[str]]]:
        """A validation's ``metric_to_watch`` value: ``(file to write, files to delete once it is written)`` when
        it enters the k best, else None."""
        if not self.k or not isinstance(value, (int, float)) or isinstance(value, bool) or math.isnan(value):
            return None
        entry = {"file": top_file_name(epoch, step, self.metric, float(value)), "value": float(value),
                 "epoch": epoch, "step": step}
        candidates = [e for e in self.kept if e["file"] != entry["file"]] + [entry]
        # stable sort: among equal values the older entry stays ahead, so a tie never replaces a kept file
        ranked = sorted(candidates, key=lambda e: e["value"], reverse=self.greater)[: self.k]
        if entry not in ranked:
            return None
        evicted = [e["file"] for e in self.kept if e not in ranked and e["file"] != entry["file"]]
        evicted += [name for name in self.untracked if name != entry["file"]]
        self.kept, self.untracked = ranked, []
        return entry["file"], evicted

    def state(self) -> List[Dict[str, Any]]:
        """The kept entries (``file``, ``value``, ``epoch``, ``step``), best first: stored in every checkpoint."""
        return [dict(e) for e in self.kept]
