"""Stop training from outside the process: create ``.stop_training`` in the run dir."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

from ..distributed import is_main_process
from .base import Callback, PhaseContext, Priority

__all__ = ["CancelTrainingCallback", "STOP_FILE"]

logger = logging.getLogger("super_trainer")

#: The file whose presence in the run dir stops training.
STOP_FILE = ".stop_training"


class CancelTrainingCallback(Callback):
    """Stops training gracefully when the file ``.stop_training`` appears in the run dir
    (``context.ckpt_dir``): ``touch <ckpt_root_dir>/<experiment_name>/.stop_training``.

    Checked at on_train_batch_end every ``interval`` train batches (one ``stat`` call, on rank 0 only; the
    trainer makes every rank agree on the stop). The stop is a stop during a batch (SPEC §1): no further
    batch starts, the partial epoch is neither validated nor checkpointed, ``ckpt_latest`` keeps the last
    completed epoch, and ``result.stop_reason == "cancelled"``.

    The file is removed once honoured, so ``resume: true`` continues instead of stopping again at once.
    """

    priority = Priority.HIGH

    def __init__(self, interval: int = 5) -> None:
        if isinstance(interval, bool) or not isinstance(interval, int) or interval < 1:
            raise ValueError(f"CancelTrainingCallback interval must be an int >= 1, got {interval!r}")
        self.interval = interval
        self._path: Optional[Path] = None

    def on_training_start(self, context: PhaseContext) -> None:
        self._path = Path(context.ckpt_dir) / STOP_FILE if is_main_process() else None

    def on_train_batch_end(self, context: PhaseContext) -> None:
        if self._path is None or context.batches_seen % self.interval:
            return
        if self._path.exists():
            logger.warning("%s found: cancelling training at epoch %d, batch %d", self._path, context.epoch,
                           context.batch_idx)
            self._path.unlink(missing_ok=True)
            context.stop_training, context.stop_reason = True, "cancelled"
