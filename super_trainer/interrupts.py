"""Ctrl-C during training: the first SIGINT asks for a stop at the end of the running train batch (where the
state is consistent, so a checkpoint taken there resumes exactly); a second one interrupts at once."""
from __future__ import annotations

import signal
import threading
from types import FrameType
from typing import Any, Optional

__all__ = ["DeferredInterrupt"]


class DeferredInterrupt:
    """Context manager installing the two-step SIGINT handler (main thread only; elsewhere it does nothing
    and Ctrl-C raises KeyboardInterrupt wherever it lands, as usual). ``requested`` turns True on the first
    Ctrl-C; the training loop checks it once per batch."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: Any = None
        self._installed = False

    def _handle(self, signum: int, frame: Optional[FrameType]) -> None:
        if self.requested:  # the second Ctrl-C: the user does not want to wait for the batch to end
            raise KeyboardInterrupt
        self.requested = True

    def __enter__(self) -> "DeferredInterrupt":
        self.requested = False
        if threading.current_thread() is threading.main_thread():
            try:
                self._previous = signal.signal(signal.SIGINT, self._handle)
                self._installed = True
            except (ValueError, OSError):  # e.g. an embedded interpreter without signal support
                self._installed = False
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._installed:
            signal.signal(signal.SIGINT, self._previous if self._previous is not None else signal.default_int_handler)
            self._installed = False
