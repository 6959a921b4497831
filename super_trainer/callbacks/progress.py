"""tqdm progress bars for the train, validation and test passes (rank 0 only).

``tqdm.auto`` picks widget bars in a Jupyter kernel that has ipywidgets and text bars everywhere else.
"""
from __future__ import annotations

import warnings
from typing import Any, Dict, Optional

from tqdm import TqdmExperimentalWarning, TqdmWarning

with warnings.catch_warnings():
    # In a kernel without ipywidgets tqdm.auto warns ("IProgress not found") and falls back to text bars,
    # which is what we want: no warning either way.
    warnings.simplefilter("ignore", TqdmWarning)
    warnings.simplefilter("ignore", TqdmExperimentalWarning)
    from tqdm.auto import tqdm

from ..batches import count_batches
from ..distributed import is_main_process
from .base import Callback, PhaseContext, Priority

__all__ = ["ProgressBar"]


def _postfix(metrics: Dict[str, Any]) -> Dict[str, str]:
    return {k: f"{v:.4g}" for k, v in metrics.items() if isinstance(v, (int, float))}


class ProgressBar(Callback):
    """One bar per pass. The loss shown on the train bar refreshes every ``log_interval`` optimizer steps
    (reading it syncs the device, so not every batch)."""

    priority = Priority.VERY_LOW

    def __init__(self) -> None:
        self._bar: Optional[tqdm] = None
        self.enabled = False
        self.log_interval = 50
        self._shown_step = -1  # the optimizer step whose loss the train bar shows

    def _open(self, total: Optional[int], desc: str) -> None:
        self._close()
        self._bar = tqdm(total=total, desc=desc, leave=desc.startswith("Train"), dynamic_ncols=True)

    def _close(self, metrics: Optional[Dict[str, Any]] = None) -> None:
        if self._bar is not None:
            if metrics:
                self._bar.set_postfix(_postfix(metrics), refresh=False)
            self._bar.close()
            self._bar = None

    def _tick(self, context: PhaseContext) -> None:
        if self._bar is not None:
            self._bar.update(1)

    def on_training_start(self, context: PhaseContext) -> None:
        self.enabled = is_main_process()
        self.log_interval = int(context.training_params.get("log_interval", 50))
        self._shown_step = -1

    def on_train_loader_start(self, context: PhaseContext) -> None:
        if self.enabled:
            limit = context.training_params.get("max_train_batches")
            self._open(count_batches(context.train_loader, limit), f"Train epoch {context.epoch}")

    def on_train_batch_end(self, context: PhaseContext) -> None:
        # one listener per batch (this runs on the hot path): the tick, and the loss once per log_interval steps
        bar = self._bar
        if bar is not None:
            bar.update(1)
            step = context.global_step
            if step % self.log_interval == 0 and step != self._shown_step:
                self._shown_step = step
                bar.set_postfix(loss=f"{context.loss.item():.4g}", refresh=False)

    def on_train_loader_end(self, context: PhaseContext) -> None:
        self._close(context.metrics_dict)

    def on_validation_loader_start(self, context: PhaseContext) -> None:
        if self.enabled:
            limit = context.training_params.get("max_valid_batches")
            self._open(count_batches(context.valid_loader, limit), f"Valid epoch {context.epoch}")

    on_validation_batch_end = _tick

    def on_validation_loader_end(self, context: PhaseContext) -> None:
        self._close(context.metrics_dict)

    def on_test_loader_start(self, context: PhaseContext) -> None:
        if self.enabled:
            name = getattr(context, "test_loader_name", None) or "test"
            self._open(count_batches(context.test_loader, None), f"Test {name}")

    on_test_batch_end = _tick

    def on_test_loader_end(self, context: PhaseContext) -> None:
        self._close(context.metrics_dict)

    def on_training_end(self, context: PhaseContext) -> None:
        self._close()
