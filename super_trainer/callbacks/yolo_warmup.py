"""``warmup_mode: yolov5_warmup``: the YOLOv5-style warmup of SuperGradients 2.x (``YoloV5WarmupLRCallback``), which
is what SG recipes' ``warmup_momentum`` and ``warmup_bias_lr`` were written for (SG 3.7 still carries them in its
SSD recipe, but its LinearEpochLRWarmup ignores them)."""
from __future__ import annotations

from typing import Any, Optional

import numpy as np

from ..batches import count_batches
from .base import Callback, PhaseContext, Priority

__all__ = ["YoloV5LRWarmup"]


class YoloV5LRWarmup(Callback):
    """At on_train_batch_loss_end (SG's Phase.TRAIN_BATCH_END, so the value serves that batch's step) of every batch of
    the epochs E < W, with n = E·N + batch_idx over N train batches per epoch and n_w = W·N:

    - lr = interp(n, [0, n_w], [start, lr0]), start = ``warmup_bias_lr`` for a param group named "bias" (a model's
      ``initialize_param_groups`` names it so, as SG's YOLO models did), else 0;
    - momentum = interp(n, [0, n_w], [``warmup_momentum``, m0]) for groups that have a momentum.

    lr0 and m0 are each group's own initial lr and momentum (SG 2.x used ``initial_lr`` and
    ``optimizer_params.momentum``, the same values for the default param groups). ``warmup_momentum`` defaults to m0,
    ``warmup_bias_lr`` to lr0. From epoch W on the schedules take over; like SG, nothing resets the last warmup values.
    """

    priority = Priority.VERY_HIGH

    def __init__(self, warmup_epochs: int, warmup_momentum: Optional[float] = None,
                 warmup_bias_lr: Optional[float] = None) -> None:
        if warmup_epochs < 1:
            raise ValueError(f"YoloV5LRWarmup: warmup_epochs must be >= 1, got {warmup_epochs!r}")
        self.warmup_epochs = warmup_epochs
        self.warmup_momentum = warmup_momentum
        self.warmup_bias_lr = warmup_bias_lr
        self._batches = 1

    def on_training_start(self, context: PhaseContext) -> None:
        for group in context.optimizer.param_groups:  # kept in the group, so a resume finds it in the checkpoint
            if "momentum" in group:
                group.setdefault("initial_momentum", group["momentum"])

    def on_train_loader_start(self, context: PhaseContext) -> None:
        params = context.training_params or {}
        self._batches = count_batches(context.train_loader, params.get("max_train_batches")) or 1

    def on_train_batch_loss_end(self, context: PhaseContext) -> None:
        if context.epoch >= self.warmup_epochs:
            return
        step = context.epoch * self._batches + context.batch_idx
        span = [0, self.warmup_epochs * self._batches]
        for group in context.optimizer.param_groups:
            lr0 = group["initial_lr"]
            start = (lr0 if self.warmup_bias_lr is None else self.warmup_bias_lr) if group.get("name") == "bias" else 0.0
            group["lr"] = float(np.interp(step, span, [start, lr0]))
            if "momentum" in group:
                m0 = group.get("initial_momentum", group["momentum"])
                begin = m0 if self.warmup_momentum is None else self.warmup_momentum
                group["momentum"] = float(np.interp(step, span, [begin, m0]))

    def __repr__(self) -> Any:
        return (f"YoloV5LRWarmup(warmup_epochs={self.warmup_epochs}, warmup_momentum={self.warmup_momentum}, "
                f"warmup_bias_lr={self.warmup_bias_lr})")
