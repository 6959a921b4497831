"""``results.csv``: one row per completed epoch in the experiment dir."""
from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any, Dict, List, Optional

from ..distributed import is_main_process
from ..files import atomic_write_text
from .base import Callback, PhaseContext, Priority

__all__ = ["CSVLogger"]


class CSVLogger(Callback):
    """Writes ``<experiment dir>/results.csv`` (or ``path``): a row per completed epoch with ``epoch``,
    ``lr``, ``seconds`` and every ``train/<name>`` and ``valid/<name>`` value, as in ``TrainingResult.history``.

    Rows are written when the next epoch starts and when training ends; a partial (stopped) epoch has no
    row. The file is rewritten whole each time (atomically), so after a resume it matches the checkpoint's
    history, and columns that appear later (a validation every N epochs) are added. Rank 0 only.
    """

    priority = Priority.LOW

    def __init__(self, path: Optional[str] = None) -> None:
        self.path: Optional[Path] = Path(path) if path else None
        self._written = -1

    def on_training_start(self, context: PhaseContext) -> None:
        if self.path is None:
            self.path = Path(context.ckpt_dir) / "results.csv"
        elif is_main_process():  # a path of your own: its folder is made once; later writes never recreate it
            self.path.parent.mkdir(parents=True, exist_ok=True)
        self._written = -1

    def on_train_loader_start(self, context: PhaseContext) -> None:
        self._write(getattr(context, "history", None))

    def on_training_end(self, context: PhaseContext) -> None:
        self._write(getattr(context, "history", None))

    def _write(self, history: Optional[List[Dict[str, Any]]]) -> None:
        if not history or len(history) == self._written or not is_main_process() or self.path is None:
            return
        columns: List[str] = []
        for row in history:
            columns.extend(k for k in row if k not in columns)
        text = io.StringIO(newline="")
        writer = csv.DictWriter(text, fieldnames=columns)
        writer.writeheader()
        for row in history:
            writer.writerow({k: v for k, v in row.items() if not isinstance(v, list)})
        atomic_write_text(self.path, text.getvalue())
        self._written = len(history)
