"""One console line per completed epoch, so the numbers stay on screen after the progress bars are gone:

``Epoch 3/10 | train loss 0.41 | valid loss 0.38 Accuracy 0.93 (best 0.93 @3) | lr 0.01 | 1.2s``

Epochs are counted from 1 here ("3 of 10 done"; the history and checkpoints count from 0).
"""
from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any, Dict, Optional

from ..distributed import is_main_process
from .base import EVENTS, Callback, PhaseContext, Priority

__all__ = ["EpochSummary"]

# Until the trainer fires on_epoch_end, the line of a completed epoch is written when the next epoch starts
# or training ends.
_NATIVE = "on_epoch_end" in EVENTS


def _fmt(value: Any) -> Optional[str]:
    if hasattr(value, "numel") and value.numel() == 1:
        value = value.item()
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return f"{value:.4g}"
    return None  # per-class lists and other non-scalars are left to the logs


class EpochSummary(Callback):
    """Prints one line to stdout at the end of each completed epoch (rank 0 only; off in ``silent_mode``).

    The line is written at ``on_epoch_end`` (after validation, best-epoch and test events). Runs after the
    progress bars (priority VERY_LOW), so it appears below the finished bars.
    """

    priority = Priority.VERY_LOW

    def __init__(self, stream: Any = None) -> None:
        self.stream = stream  # None: sys.stdout at print time (so notebooks and capsys see it)
        self.enabled = False
        self._started = 0.0
        self._train: Dict[str, Any] = {}
        self._valid: Dict[str, Any] = {}
        self._lr: Optional[float] = None
        self._best_epoch: Optional[int] = None
        self._pending = False
        self._epoch: Optional[int] = None

    def on_training_start(self, context: PhaseContext) -> None:
        self.enabled = is_main_process()
        self._best_epoch = getattr(context, "best_epoch", None)

    def on_train_loader_start(self, context: PhaseContext) -> None:
        self._flush(context)
        self._started = time.perf_counter()
        self._train, self._valid, self._pending = {}, {}, False

    def on_train_loader_end(self, context: PhaseContext) -> None:
        self._train = dict(context.metrics_dict or {})
        self._epoch = context.epoch
        lrs = getattr(context, "epoch_lrs", None) or [g["lr"] for g in context.optimizer.param_groups]
        self._lr = lrs[0] if lrs else None
        if not _NATIVE:  # a stop during a batch (or Ctrl-C) leaves a partial epoch: no line for it
            self._pending = not context.stop_training

    def on_validation_loader_end(self, context: PhaseContext) -> None:
        self._valid = dict(context.metrics_dict or {})

    def on_validation_end_best_epoch(self, context: PhaseContext) -> None:
        self._best_epoch = context.epoch

    def on_epoch_end(self, context: PhaseContext) -> None:
        self._pending = True  # fired only for completed epochs
        self._flush(context)

    def on_training_end(self, context: PhaseContext) -> None:
        reason = getattr(context, "stop_reason", None)
        if reason not in ("interrupted", "exception", "nan_loss"):
            self._flush(context)
        self._pending = False
        if reason == "interrupted" and self.enabled:  # Ctrl-C: this one line instead of a traceback
            print(self.interrupted_line(context), file=self.stream or sys.stdout, flush=True)

    def interrupted_line(self, context: PhaseContext) -> str:
        """The one-line report after Ctrl-C: where it stopped, what ckpt_latest holds, the best so far."""
        epoch = context.epoch or 0
        max_epochs = context.training_params.get("max_epochs") if context.training_params is not None else None
        text = f"Training interrupted in epoch {epoch + 1}" + (f"/{max_epochs}" if max_epochs else "")
        if context.ckpt_dir is not None and (Path(context.ckpt_dir) / "ckpt_latest.pth").exists():
            text += f" | {Path(context.ckpt_dir) / 'ckpt_latest.pth'} holds {epoch} completed epoch(s)"
        if context.best_metric is not None:
            where = f" @{self._best_epoch + 1}" if self._best_epoch is not None else ""
            text += f" | best {context.metric_to_watch} {_fmt(context.best_metric)}{where}"
        return text

    def _flush(self, context: PhaseContext) -> None:
        if self._pending and self.enabled:
            stream = self.stream or sys.stdout
            print(self.line(context), file=stream, flush=True)
        self._pending = False

    def line(self, context: PhaseContext) -> str:
        """The summary of the epoch just completed."""
        epoch = self._epoch if self._epoch is not None else (context.epoch or 0)
        max_epochs = context.training_params.get("max_epochs") if context.training_params is not None else None
        parts = [f"Epoch {epoch + 1}/{max_epochs}" if max_epochs else f"Epoch {epoch + 1}"]
        train_loss = next((_fmt(v) for v in self._train.values() if _fmt(v) is not None), None)
        if train_loss is not None:
            parts.append(f"train loss {train_loss}")
        if self._valid:
            watched = str(context.metric_to_watch or "").lower()
            shown = []
            for index, (name, value) in enumerate(self._valid.items()):
                text = _fmt(value)
                if text is None:
                    continue
                label = "loss" if index == 0 and name in self._train else name
                item = f"{label} {text}"
                if name.lower() == watched and context.best_metric is not None:
                    where = f" @{self._best_epoch + 1}" if self._best_epoch is not None else ""
                    item += f" (best {_fmt(context.best_metric)}{where})"
                shown.append(item)
            parts.append("valid " + " ".join(shown))
        if self._lr is not None:
            parts.append(f"lr {self._lr:.4g}")
        parts.append(f"{time.perf_counter() - self._started:.1f}s")
        return " | ".join(parts)


if not _NATIVE:
    del EpochSummary.on_epoch_end
