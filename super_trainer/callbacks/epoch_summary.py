"""One console line per completed epoch, so the numbers stay on screen after the progress bars are gone:

``Epoch 3/10 | train loss 0.41 | valid loss 0.38 Accuracy 0.93 (best 0.93 @3) | lr 0.01 | 1.2s``

Epochs are counted from 1 here ("3 of 10 done"; the history and checkpoints count from 0). After Ctrl-C it
prints one report line instead of a traceback.
"""
from __future__ import annotations

import shlex
import sys
import time
from pathlib import Path
from typing import Any, Dict, Optional

from ..distributed import is_main_process
from .base import Callback, PhaseContext, Priority

__all__ = ["EpochSummary"]


def _fmt(value: Any) -> Optional[str]:
    if hasattr(value, "numel") and value.numel() == 1:
        value = value.item()
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return f"{value:.4g}"
    return None  # per-class lists and other non-scalars are left to the logs


def _label(loss_name: str) -> str:
    """"loss" for a single loss; a component ("LossClass/component") keeps its name."""
    return loss_name if "/" in loss_name else "loss"


def _epochs(context: PhaseContext) -> str:
    """``"3/10"``: the 1-based epoch number over max_epochs."""
    epoch = (context.epoch or 0) + 1
    max_epochs = getattr(context, "max_epochs", None)
    return f"{epoch}/{max_epochs}" if max_epochs else str(epoch)


def _best(context: PhaseContext) -> str:
    best_epoch = getattr(context, "best_epoch", None)
    where = f" @{best_epoch + 1}" if best_epoch is not None else ""
    return f"{_fmt(context.best_metric)}{where}"


class EpochSummary(Callback):
    """Prints one line to stdout at ``on_epoch_end`` (after validation, best-epoch and test events) of each
    completed epoch, and one report line after Ctrl-C. Rank 0 only; added unless ``silent_mode``. Runs after
    the progress bars (priority VERY_LOW), so the line appears below the finished bars."""

    priority = Priority.VERY_LOW

    def __init__(self, stream: Any = None) -> None:
        self.stream = stream  # None: sys.stdout at print time (so notebooks and capsys see it)
        self.enabled = False
        self._started = 0.0
        self._train: Dict[str, Any] = {}
        self._valid: Dict[str, Any] = {}
        self._lr: Optional[float] = None

    def _print(self, text: str) -> None:
        print(text, file=self.stream or sys.stdout, flush=True)

    def on_training_start(self, context: PhaseContext) -> None:
        self.enabled = is_main_process()

    def on_train_loader_start(self, context: PhaseContext) -> None:
        self._started = time.perf_counter()
        self._train, self._valid = {}, {}

    def on_train_loader_end(self, context: PhaseContext) -> None:
        self._train = dict(context.metrics_dict or {})
        lrs = getattr(context, "epoch_lrs", None) or [g["lr"] for g in context.optimizer.param_groups]
        self._lr = max(lrs) if lrs else None  # param groups may differ (a frozen one has 0): the largest

    def on_validation_loader_end(self, context: PhaseContext) -> None:
        self._valid = dict(context.metrics_dict or {})

    def on_epoch_end(self, context: PhaseContext) -> None:
        if self.enabled:
            self._print(self.line(context))

    def on_training_end(self, context: PhaseContext) -> None:
        if self.enabled and getattr(context, "stop_reason", None) in ("interrupted", "terminated"):
            self._print(self.interrupted_line(context))  # Ctrl-C, SIGTERM: this one line instead of a traceback

    def line(self, context: PhaseContext) -> str:
        """The summary of the epoch that just completed."""
        parts = [f"Epoch {_epochs(context)}"]
        first = next(((name, _fmt(v)) for name, v in self._train.items() if _fmt(v) is not None), None)
        if first is not None:  # the loss (a loss with components: its first component, by name)
            parts.append(f"train {_label(first[0])} {first[1]}")
        if self._valid:
            watched = str(context.metric_to_watch or "").lower()
            shown = []
            for index, (name, value) in enumerate(self._valid.items()):
                text = _fmt(value)
                if text is None:
                    continue
                item = f"{_label(name) if index == 0 and name in self._train else name} {text}"
                if name.lower() == watched and context.best_metric is not None:
                    item += f" (best {_best(context)})"
                shown.append(item)
            parts.append("valid " + " ".join(shown))
        if self._lr is not None:
            parts.append(f"lr {self._lr:.4g}")
        parts.append(f"{time.perf_counter() - self._started:.1f}s")
        return " | ".join(parts)

    def interrupted_line(self, context: PhaseContext) -> str:
        """The report after Ctrl-C or SIGTERM: where it stopped, the checkpoint to resume from, the best so far."""
        text = f"Training {context.stop_reason} in epoch {_epochs(context)}"
        latest = Path(context.ckpt_dir) / "ckpt_latest.pth" if context.ckpt_dir is not None else None
        if latest is not None and latest.exists():
            text += f" | resume from {shlex.quote(str(latest))}"  # copy-pasteable, also with spaces in the path
        if context.best_metric is not None:
            text += f" | best {context.metric_to_watch} {_best(context)}"
        return text
