"""tqdm progress bars for the train, validation and test passes (rank 0 only).

``tqdm.auto`` picks widget bars in a Jupyter kernel that has ipywidgets and text bars everywhere else.
"""
from __future__ import annotations

import sys
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


class _Bar(tqdm):  # type: ignore[misc,valid-type]
    """tqdm (text or notebook) without its monitor thread: tqdm starts that thread with the first open bar and joins
    it when the last one closes, i.e. once per pass here (~0.5 ms of a short run's CPU). The thread only lowers a
    bar's ``miniters`` after a stall; ours is 1 (the callback already updates at most 50 times per pass), so the
    bar still redraws at the first update after ``mininterval``."""

    monitor_interval = 0


def _is_terminal(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


def _postfix(metrics: Dict[str, Any]) -> Dict[str, str]:
    return {k: f"{v:.4g}" for k, v in metrics.items() if isinstance(v, (int, float))}


def _redraws_now(bar: Any) -> bool:
    """Whether ``bar.update`` redraws now: tqdm redraws at an update once ``mininterval`` has passed since its last
    draw (``miniters`` is 1 here)."""
    last = getattr(bar, "last_print_t", None)
    return last is None or bar._time() - last >= bar.mininterval


#: A bar of a pass with a known length advances in at most this many updates (tqdm.update every batch cost
#: ~2 us per step of a small model; the count moves in steps of 2 % of the pass, and ends exact).
UPDATES_PER_PASS = 50


class ProgressBar(Callback):
    """One bar per pass. The loss shown on the train bar is read when the bar redraws, at most once per
    ``log_interval`` optimizer steps (reading it syncs the device, so not every batch; a loss no redraw would show
    is not read). A bar advances in at most 50 updates (every batch for a loader without len()), and shows the
    exact count when its pass ends."""

    priority = Priority.VERY_LOW

    def __init__(self) -> None:
        self._bar: Optional[_Bar] = None
        self.enabled = False
        self.log_interval = 50
        self._shown_interval = -1  # the log_interval period whose loss the train bar shows
        self._pending = 0  # batches done that the bar does not show yet
        self._every = 1  # batches per bar update
        # follow the terminal's width only on a terminal: elsewhere (a log file, a pipe, a notebook) there is no
        # width to follow, and tqdm would ask the OS for one at every redraw (an ioctl that fails, then the
        # environment: ~30 us each with cold caches)
        self._terminal = False

    def _open(self, total: Optional[int], desc: str) -> None:
        self._close()
        self._bar = _Bar(total=total, desc=desc, leave=desc.startswith("Train"), dynamic_ncols=self._terminal,
                         miniters=1)
        self._pending, self._every = 0, max(1, -(-(total or 0) // UPDATES_PER_PASS))  # ceil: <= 50 updates

    def _close(self, metrics: Optional[Dict[str, Any]] = None) -> None:
        if self._bar is not None:
            if self._pending:
                self._bar.update(self._pending)
                self._pending = 0
            if metrics:
                self._bar.set_postfix(_postfix(metrics), refresh=False)
            self._bar.close()
            self._bar = None

    def _tick(self, context: PhaseContext) -> None:
        self._pending += 1
        if self._pending >= self._every and self._bar is not None:
            self._bar.update(self._pending)
            self._pending = 0

    def on_training_start(self, context: PhaseContext) -> None:
        self.enabled = is_main_process()
        self._terminal = _is_terminal(sys.stderr)  # where tqdm writes
        self.log_interval = int(context.training_params.get("log_interval", 50))
        self._shown_interval = -1

    def on_train_loader_start(self, context: PhaseContext) -> None:
        if self.enabled:
            limit = context.training_params.get("max_train_batches")
            self._open(count_batches(context.train_loader, limit), f"Train epoch {context.epoch}")

    def on_train_batch_end(self, context: PhaseContext) -> None:
        if self._pending + 1 >= self._every and self._bar is not None:  # this tick updates the bar
            self._show_loss(context)
        self._tick(context)

    def _show_loss(self, context: PhaseContext) -> None:
        """Before an update that redraws: the loss on the bar, read (a device sync) at most once per log_interval."""
        interval = context.global_step // self.log_interval
        if interval != self._shown_interval and _redraws_now(self._bar):
            self._shown_interval = interval
            self._bar.set_postfix(loss=f"{context.loss.item():.4g}", refresh=False)

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
