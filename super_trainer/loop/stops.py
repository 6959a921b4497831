"""Whether the loop goes on: stops requested by callbacks, Ctrl-C, a non-finite loss, and every rank agreeing.

The rules (SPEC §1, §7; the table in docs/events.md):

- ``context.stop_training`` set during a train batch stops at once: no further backward, step or batch; the
  partial epoch is neither validated, tested nor checkpointed. Set anywhere else, it is held until the epoch's
  training pass ends, and training ends after that epoch (validation, test, checkpoints included).
- The first Ctrl-C is deferred: the running batch finishes, then training stops as for a stop during a batch
  (stop_reason "interrupted", and ckpt_latest is written at that batch). A second Ctrl-C interrupts at once.
- A non-finite loss (``stop_on_non_finite_loss``) stops with "nan_loss" without a host sync per step: the losses
  kept on the device are read every ``log_interval`` steps, before a checkpoint and at the epoch's end.
- Under DDP every rank agrees on a stop before the next collective.
"""
from __future__ import annotations

import logging
import math
import signal
import threading
from types import FrameType
from typing import Any, Mapping, Optional, Sequence

from .. import distributed
from ..context import PhaseContext
from ..metrics import LossAverager

__all__ = ["StopControl", "NonFiniteGuard", "DeferredInterrupt"]

logger = logging.getLogger("super_trainer")


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


class NonFiniteGuard:
    """Reads the train losses kept on the device for NaN/Inf: one host sync per read, never one per step."""

    def __init__(self, enabled: bool, every: int, losses: LossAverager) -> None:
        self.enabled = enabled
        self.every = every if enabled else 0  # read every N optimizer steps (log_interval); 0: never
        self.losses = losses

    def seen(self, context: PhaseContext, before: str) -> bool:
        """Reads the losses logged since the last read; stops with "nan_loss" if any is NaN/Inf."""
        if not self.enabled or self.losses.all_finite_since_check():
            return False
        self.stop(context)
        logger.warning("non-finite loss before %s; stopping without checkpointing epoch %d", before, context.epoch)
        return True

    def epoch_finite(self, context: PhaseContext, metrics: Mapping[str, Any], loss_names: Sequence[str]) -> bool:
        """The epoch's loss averages are finite (a NaN/Inf in any batch makes its average non-finite); stops
        with "nan_loss" when they are not."""
        if not self.enabled or all(math.isfinite(metrics[name]) for name in loss_names
                                   if isinstance(metrics.get(name), float)):
            return True
        self.stop(context)
        return False

    @staticmethod
    def stop(context: PhaseContext) -> None:
        context.stop_training, context.stop_reason = True, "nan_loss"
        logger.warning("non-finite training loss in epoch %d: training stops (stop_reason 'nan_loss'); ckpt_latest "
                       "and ckpt_best keep the last good weights", context.epoch)


class StopControl:
    """Owns "does the loop go on?". Used as a context manager around the whole fit (it installs the Ctrl-C
    handler); the loop calls it at fixed points of each batch and epoch."""

    def __init__(self, context: PhaseContext, guard: NonFiniteGuard, is_distributed: bool) -> None:
        self.context = context
        self.guard = guard
        self.distributed = is_distributed
        self.interrupt = DeferredInterrupt()
        self.held = False  # a stop requested outside a batch, applied at the epoch's end
        self.interrupted_pass = False  # Ctrl-C ended the running train pass

    def __enter__(self) -> "StopControl":
        self.interrupt.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.interrupt.__exit__(*exc)

    def interrupted(self) -> bool:
        """The first Ctrl-C came (evaluation passes check this between batches)."""
        return self.interrupt.requested

    # ---- the train pass ----------------------------------------------------------------------------
    def open_epoch(self) -> None:
        """Hold a stop requested before the epoch, so the batch checks react only to stops requested during a
        batch."""
        self.held, self.context.stop_training = self.context.stop_training, False
        self.interrupted_pass = False

    def go_on(self, context: PhaseContext) -> bool:
        """Before backward: no stop requested in this batch so far (under DDP every rank agrees first, since
        backward all-reduces)."""
        if self.distributed:
            context.stop_training = distributed.any_rank_true(context.stop_training, context.device)
        return not context.stop_training

    def check_losses_periodically(self, context: PhaseContext) -> None:
        """After an optimizer step: every ``log_interval`` steps, read the losses (one host sync)."""
        if self.guard.every and context.global_step % self.guard.every == 0:
            self.guard.seen(context, "training")

    def end_of_batch(self, context: PhaseContext, read_losses: bool = False) -> bool:
        """After on_train_batch_end: True when the pass must end here (a stop, the first Ctrl-C, or, when
        ``read_losses`` (a checkpoint is due), a non-finite loss since the last read), agreed by every rank."""
        if read_losses and not context.stop_training:
            self.guard.seen(context, "a step checkpoint")
        if self.interrupt.requested:
            self.interrupted_now(context)
        if self.distributed:
            context.stop_training = distributed.any_rank_true(context.stop_training, context.device)
        return bool(context.stop_training)

    def interrupted_now(self, context: PhaseContext) -> None:
        """Ctrl-C: the first one seen at a batch's end, or a KeyboardInterrupt that reached the loop (a second
        Ctrl-C, or one where no handler was installed)."""
        context.stop_training, context.stop_reason = True, "interrupted"
        self.interrupted_pass = True

    def finite_before(self, context: PhaseContext, what: str) -> bool:
        """The losses since the last read are finite (else a "nan_loss" stop): checked before a checkpoint."""
        return not self.guard.seen(context, what)

    def epoch_completed(self, context: PhaseContext, metrics: Mapping[str, Any], loss_names: Sequence[str]) -> bool:
        """At the pass's end: False when a stop came during a batch or the epoch's losses are not finite (then the
        epoch is neither validated nor checkpointed); otherwise the held stop, if any, is applied."""
        if context.stop_training:
            return False
        context.stop_training = self.held
        return self.guard.epoch_finite(context, metrics, loss_names)

    # ---- between epochs ----------------------------------------------------------------------------
    def agree(self, context: PhaseContext) -> None:
        """Every rank stops when one does (after validation, where EarlyStop decides)."""
        context.stop_training = distributed.any_rank_true(context.stop_training, context.device)
