"""A TensorBoard event file written on the calling thread, for :class:`~super_trainer.callbacks.logging.TensorBoardLogger`.

``torch.utils.tensorboard.SummaryWriter`` hands every record to a background thread, which the logger then waited
for at every flush (it flushes synchronously, in bulk, at epoch-level events, so that the thread never competes with
training for the GIL). That thread, started and joined once per run, and its hand-offs were most of the logger's
cost on a short run (~0.5 ms). This file keeps everything else of TensorBoard's: the summaries are built by
``torch.utils.tensorboard.summary`` (as SummaryWriter builds them), the events are ``event_pb2.Event`` records
framed by tensorboard's ``RecordWriter``, the file is named as tensorboard names it, and ``purge_step`` writes
the same two events SummaryWriter writes.
"""
from __future__ import annotations

import functools
import itertools
import os
import socket
import time
from pathlib import Path
from typing import Any, Iterable, List, Optional, Tuple

__all__ = ["EventFile"]

_file_counter = itertools.count()  # two files opened in one second by one process get distinct names


@functools.lru_cache(maxsize=1)
def _tensorflow_bins() -> List[float]:
    """TensorFlow's default histogram buckets, as SummaryWriter's ``default_bins``: +-1e-12 growing by 10 % to 1e20."""
    buckets, edge = [], 1e-12
    while edge < 1e20:
        buckets.append(edge)
        edge *= 1.1
    return [-b for b in reversed(buckets)] + [0.0] + buckets


class EventFile:
    """One ``events.out.tfevents.*`` file in ``log_dir``; records are buffered until :meth:`flush` / :meth:`close`.
    With ``purge_step``, TensorBoard discards the points at or past that step that earlier files of the dir hold
    (a resumed run's)."""

    def __init__(self, log_dir: Path, purge_step: Optional[int] = None) -> None:
        # imported here, on first use: they pull in tensorboard
        from tensorboard.compat.proto.event_pb2 import Event, SessionLog
        from tensorboard.compat.proto.summary_pb2 import Summary
        from tensorboard.summary.writer.record_writer import RecordWriter
        from torch.utils.tensorboard import summary

        self._event, self._summary, self._summaries = Event, Summary, summary
        name = f"events.out.tfevents.{int(time.time()):010d}.{socket.gethostname()}.{os.getpid()}.{next(_file_counter)}"
        self.path = Path(log_dir) / name
        self._records = RecordWriter(open(self.path, "wb"))
        self._write(Event(wall_time=time.time(), file_version="brain.Event:2"))
        if purge_step is not None:
            self._write(Event(step=purge_step, file_version="brain.Event:2"))
            self._write(Event(step=purge_step, session_log=SessionLog(status=SessionLog.START)))
        self.flush()

    def _write(self, event: Any) -> None:
        self._records.write(event.SerializeToString())

    def add_summary(self, summary: Any, step: int) -> None:
        self._write(self._event(wall_time=time.time(), step=int(step), summary=summary))

    def add_scalar(self, tag: str, value: float, step: int) -> None:
        """The ``simple_value`` summary torch's ``summary.scalar`` builds for a number (built here directly: the
        logger only passes Python floats)."""
        self.add_scalars([(tag, value)], step)

    def add_scalars(self, points: Iterable[Tuple[str, float]], step: int) -> None:
        """Several ``(tag, value)`` points of one step as one event (one summary holding a value per point, as
        TensorFlow's summary ops write them): readers see the same points as from one ``add_scalar`` each, for one
        record's cost."""
        proto = self._summary
        values = [proto.Value(tag=tag, simple_value=float(value)) for tag, value in points]
        self.add_summary(proto(value=values), step)

    def add_text(self, tag: str, text: str, step: int) -> None:
        self.add_summary(self._summaries.text(tag, text), step)

    def add_image(self, tag: str, image: Any, step: int, dataformats: str = "CHW") -> None:
        self.add_summary(self._summaries.image(tag, image, dataformats=dataformats), step)

    def add_histogram(self, tag: str, values: Any, step: int, bins: Any = "auto") -> None:
        """``bins`` as numpy.histogram takes it (a count, edges or a method name such as "auto"), or SummaryWriter's
        "tensorflow" (TensorFlow's fixed exponential buckets)."""
        if isinstance(bins, str) and bins == "tensorflow":
            bins = _tensorflow_bins()
        self.add_summary(self._summaries.histogram(tag, values, bins), step)

    def flush(self) -> None:
        self._records.flush()

    def close(self) -> None:
        if not self._records.closed:
            self._records.close()
