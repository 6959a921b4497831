"""``average_best_models``: average the weights of the best validation epochs into ``average_model.pth``."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch

from ..checkpoint import read_checkpoint, save_checkpoint
from ..modules import unwrap_model
from ..distributed import is_main_process
from ..metrics import lookup_metric
from .base import Callback, PhaseContext, Priority

__all__ = ["AverageBestModels"]

SNAPSHOTS = "average_model_snapshots.pth"
AVERAGE = "average_model.pth"


class AverageBestModels(Callback):
    """Keeps the weights of the ``max_models`` best validation epochs (by metric_to_watch) and, whenever
    that set changes, writes their element-wise mean to ``<experiment dir>/average_model.pth``.

    The weights averaged are the EMA weights when EMA is on. Integer buffers (e.g. BatchNorm's
    ``num_batches_tracked``) are taken from the best epoch. The kept snapshots live in
    ``average_model_snapshots.pth`` so a resumed run continues the same average. Rank 0 only.
    """

    priority = Priority.LOW

    def __init__(self, metric_to_watch: str, greater_is_better: bool = True, max_models: int = 10) -> None:
        self.metric_to_watch = metric_to_watch
        self.greater_is_better = greater_is_better
        self.max_models = max_models
        self.kept: List[Dict[str, Any]] = []  # {"epoch", "value"}, best first
        self._weights: Dict[int, Dict[str, torch.Tensor]] = {}
        self._dir: Optional[Path] = None
        self._enabled = False

    def on_training_start(self, context: PhaseContext) -> None:
        self._enabled = is_main_process()
        self._dir = Path(context.ckpt_dir)
        snapshots = self._dir / SNAPSHOTS
        if self._enabled and self.kept and snapshots.is_file():  # resumed: reload the kept weights
            saved = read_checkpoint(snapshots, required_keys=("weights",))["weights"]
            self._weights = {int(epoch): weights for epoch, weights in saved.items()}
            self.kept = [k for k in self.kept if k["epoch"] in self._weights]

    def on_validation_loader_end(self, context: PhaseContext) -> None:
        if not self._enabled:
            return
        value = lookup_metric(context.metrics_dict or {}, self.metric_to_watch)
        if value is None or not isinstance(value, (int, float)) or math.isnan(value):
            return
        candidates = [k for k in self.kept if k["epoch"] != context.epoch] + [{"epoch": context.epoch, "value": value}]
        candidates.sort(key=lambda k: k["value"], reverse=self.greater_is_better)  # stable: earlier epochs win ties
        kept = candidates[: self.max_models]
        if not any(k["epoch"] == context.epoch for k in kept):
            return
        source = context.ema_model.ema if context.ema_model is not None else unwrap_model(context.net)
        self._weights[context.epoch] = {k: v.detach().to("cpu", copy=True) for k, v in source.state_dict().items()}
        self.kept = kept
        self._weights = {k["epoch"]: self._weights[k["epoch"]] for k in kept}
        save_checkpoint({"weights": self._weights}, self._dir / SNAPSHOTS)
        save_checkpoint({"net": self._average(), "epoch": context.epoch + 1, "averaged_epochs": [k["epoch"] for k in kept],
                         "averaged_metrics": [k["value"] for k in kept], "format": "super_trainer/average"},
                        self._dir / AVERAGE)

    def _average(self) -> Dict[str, torch.Tensor]:
        snapshots = [self._weights[k["epoch"]] for k in self.kept]
        averaged = {}
        for name, first in snapshots[0].items():
            if first.is_floating_point():
                averaged[name] = torch.stack([s[name] for s in snapshots]).mean(dim=0)
            else:
                averaged[name] = first.clone()
        return averaged

    def state_dict(self) -> Dict[str, Any]:
        return {"kept": list(self.kept)}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.kept = list(state.get("kept", []))

