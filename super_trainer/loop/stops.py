"""Whether the loop goes on: stops requested by callbacks, Ctrl-C, a non-finite loss, and every rank agreeing.

The rules (SPEC §1, §7; the table in docs/events.md):

- ``context.stop_training`` set during a train batch stops at once: no further backward, step or batch; the
  partial epoch is neither validated, tested nor checkpointed. Set anywhere else, it is held until the epoch's
  training pass ends, and training ends after that epoch (validation, test, checkpoints included).
- The first Ctrl-C (SIGINT) or SIGTERM is deferred: the running batch finishes, then training stops as for a stop
  during a batch (stop_reason "interrupted" or "terminated", and ckpt_latest is written at that batch). A second
  signal, of either kind, interrupts at once and keeps the first one's reason.
- A non-finite loss (``stop_on_non_finite_loss``) stops with "nan_loss" without a host sync per step: the losses
  kept on the device are read every ``log_interval`` steps, before a checkpoint and at the epoch's end. Before
  every checkpoint the weights are checked too (one host sync), so NaN weights from a NaN gradient with a finite
  loss are never checkpointed.
- Under DDP every rank agrees on a stop, and on a signal's reason, before the next collective.
"""
from __future__ import annotations

import contextlib
import logging
import math
import signal
import threading
from types import FrameType
from typing import Any, Callable, ContextManager, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

import torch

from .. import distributed
from ..context import PhaseContext
from ..metrics import LossAverager

__all__ = ["StopControl", "NonFiniteGuard", "DeferredInterrupt", "Terminated", "SIGNAL_REASONS"]

logger = logging.getLogger("super_trainer")


SIGNAL_REASONS = {signal.SIGINT: "interrupted", signal.SIGTERM: "terminated"}


class Terminated(KeyboardInterrupt):
    """The second signal after a first SIGTERM: interrupts at once like a second Ctrl-C, and tells the CLI to exit
    with 143 (128 + SIGTERM) rather than 130."""


class DeferredInterrupt:
    """Context manager installing the deferring handler of SIGINT (Ctrl-C) and SIGTERM (what schedulers send
    before SIGKILL) for the fit, and restoring the previous handlers after it (main thread only; elsewhere it
    does nothing and the signals act as usual). ``requested`` turns True on the first signal; the training loop
    checks it once per batch. A second signal raises KeyboardInterrupt (:class:`Terminated` when the first was
    SIGTERM)."""

    def __init__(self) -> None:
        self.signum: Optional[int] = None  # the first signal received, until the fit ends
        self.requested = False  # a first signal came (an attribute: the loop reads it every batch)
        self.taken = False  # the loop stopped for a signal (this process's, or another rank's)
        self._previous: Dict[int, Any] = {}
        self._holding = False  # inside holding(): a second signal waits for the block's end
        self._second_held = False

    @property
    def reason(self) -> str:
        """The stop reason of the first signal ("interrupted" when none came: a KeyboardInterrupt raised by code)."""
        return SIGNAL_REASONS.get(self.signum, "interrupted")  # type: ignore[arg-type]

    def _handle(self, signum: int, frame: Optional[FrameType]) -> None:
        if self.signum is not None:  # the second signal: the user does not want to wait for the batch to end
            if self._holding:
                self._second_held = True
                return
            self._raise_second()
        self.signum, self.requested = signum, True

    def _raise_second(self) -> None:
        raise Terminated if self.signum == signal.SIGTERM else KeyboardInterrupt

    @contextlib.contextmanager
    def holding(self) -> Iterator[None]:
        """A block that a second signal must not cut (writing the last checkpoint on the training thread, a few
        milliseconds): one that comes inside it is raised at its end."""
        self._holding, self._second_held = True, False
        try:
            yield
        finally:
            self._holding = False
        if self._second_held:
            self._second_held = False
            self._raise_second()

    def __enter__(self) -> "DeferredInterrupt":
        self.signum, self.requested, self.taken, self._previous = None, False, False, {}
        if threading.current_thread() is threading.main_thread():
            try:
                for signum in SIGNAL_REASONS:
                    self._previous[signum] = signal.signal(signum, self._handle)
            except (ValueError, OSError):  # e.g. an embedded interpreter without signal support
                self.__exit__()
        return self

    def __exit__(self, *exc: Any) -> None:
        for signum, previous in self._previous.items():
            default = signal.default_int_handler if signum == signal.SIGINT else signal.SIG_DFL
            signal.signal(signum, previous if previous is not None else default)
        self._previous = {}


class NonFiniteGuard:
    """Reads the train losses kept on the device for NaN/Inf (one host sync per read, never one per step), and
    the weights before a checkpoint is written (one host sync)."""

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

    def checkpointable(self, context: PhaseContext, before: str) -> bool:
        """The losses since the last read and the weights are finite; else a "nan_loss" stop (no checkpoint)."""
        return not self.seen(context, before) and self.weights_finite(context)

    def weights_finite(self, context: PhaseContext) -> bool:
        """Every parameter and floating buffer of the model (and of its EMA) is finite; else a "nan_loss" stop.
        A NaN gradient with a finite loss (normalizing a zero vector) makes NaN weights that no loss shows."""
        if not self.enabled or all_finite(_weights(context)):
            return True
        self.stop(context, "weights")
        return False

    def epoch_finite(self, context: PhaseContext, metrics: Mapping[str, Any], loss_names: Sequence[str]) -> bool:
        """The epoch's loss averages are finite (a NaN/Inf in any batch makes its average non-finite); stops
        with "nan_loss" when they are not."""
        if not self.enabled or all(math.isfinite(metrics[name]) for name in loss_names
                                   if isinstance(metrics.get(name), float)):
            return True
        self.stop(context)
        return False

    @staticmethod
    def stop(context: PhaseContext, what: str = "loss") -> None:
        context.stop_training, context.stop_reason = True, "nan_loss"
        logger.warning("non-finite training %s in epoch %d: training stops (stop_reason 'nan_loss'); ckpt_latest "
                       "and ckpt_best keep the last good weights", what, context.epoch)


def _weights(context: PhaseContext) -> List[torch.Tensor]:
    """The model's (and its EMA's) parameters and floating buffers, local shards of sharded ones."""
    ema = context.ema_model
    modules = [context.net] + ([ema.ema] if ema is not None and ema.ema is not None else [])
    found: List[torch.Tensor] = []
    for module in modules:
        found += [t for t in module.parameters()]
        found += [t for t in module.buffers() if t.is_floating_point()]
    if ema is not None and ema.ema is None:  # ShardedModelEMA (FSDP2) keeps tensors, not a module
        found += [t for t in ema.sharded_state_dict().values() if t.is_floating_point()]
    found = [t.to_local() if hasattr(t, "to_local") else t for t in found]  # a DTensor (FSDP2): its shard
    return [t.detach() for t in found if t.numel()]


def all_finite(tensors: Sequence[torch.Tensor]) -> bool:
    """No NaN/Inf in ``tensors``: a NaN/Inf value makes its tensor's 2-norm NaN/Inf, and the sum of the norms with
    it (norms are >= 0: nothing cancels an Inf). One fused ``_foreach_norm`` per device and dtype (the fastest
    reduction on CPU; half-precision norms in float32, where they cannot overflow), one sum and one host sync per
    device. Only weights beyond ~1e19 also count as non-finite (their squares overflow float32; a sum of finite
    norms, each below ~2e19, stays finite)."""
    groups: Dict[Tuple[torch.device, torch.dtype], List[torch.Tensor]] = {}
    for tensor in tensors:
        groups.setdefault((tensor.device, tensor.dtype), []).append(tensor)
    sums: Dict[torch.device, List[torch.Tensor]] = {}
    with torch.no_grad():
        for (device, dtype), group in groups.items():
            wide = None if dtype in (torch.float32, torch.float64) else torch.float32
            norms = torch._foreach_norm(group, dtype=wide)
            sums.setdefault(device, []).append(torch.stack(norms).sum() if len(norms) > 1 else norms[0])
        totals = [found[0] if len(found) == 1 else torch.stack([t.double() for t in found]).sum()
                  for found in sums.values()]  # one per device: several dtypes summed in float64
    return all(math.isfinite(total.item()) for total in totals)


class StopControl:
    """Owns "does the loop go on?". Used as a context manager around the whole fit (it installs the Ctrl-C and
    SIGTERM handler); the loop calls it at fixed points of each batch and epoch."""

    def __init__(self, context: PhaseContext, guard: NonFiniteGuard, is_distributed: bool,
                 stop_can_change: Callable[[], bool] = lambda: True) -> None:
        self.context = context
        self.guard = guard
        self.distributed = is_distributed
        # under DDP: (stop, SIGTERM, Ctrl-C) from every rank in one all-reduce of one element
        self.vote = distributed.RankVote(3, context.device) if is_distributed else None
        self.stop_can_change = stop_can_change  # a callback or train_step may set stop_training inside a batch
        self.interrupt = DeferredInterrupt()
        self.held = False  # a stop requested outside a batch, applied at the epoch's end
        self.interrupted_pass = False  # a signal (or a KeyboardInterrupt) ended the running train pass
        self.agreed_reason: Optional[str] = None  # under DDP: the signal's reason every rank stopped for

    def __enter__(self) -> "StopControl":
        self.interrupt.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        """The handlers stay installed until ``closing``: a signal while the last write lands is deferred too."""

    def closing(self, context: PhaseContext) -> None:
        """Once the last write landed, before on_training_end: a first signal that came while waiting for it still
        sets the stop reason (the CLI exits 143 after a SIGTERM); then the previous handlers are restored."""
        if self.interrupt.requested and not self.interrupt.taken and context.exception is None:
            context.stop_training, context.stop_reason = True, self.interrupt.reason
            self.interrupt.taken = True
        self.interrupt.__exit__()

    def holding_signals(self) -> ContextManager[None]:
        """A block a second signal must not cut (the last checkpoint's write): one that comes is raised at its end."""
        return self.interrupt.holding()

    def interrupted(self) -> bool:
        """A first signal came (evaluation passes check this between batches). Under DDP a pass runs to its end
        and the ranks agree after validation (``agree``): a pass cut short on one rank would hang the others."""
        return self.interrupt.requested and not self.distributed

    # ---- the train pass ----------------------------------------------------------------------------
    def open_epoch(self) -> None:
        """Hold a stop requested before the epoch, so the batch checks react only to stops requested during a
        batch."""
        self.held, self.context.stop_training = self.context.stop_training, False
        self.interrupted_pass = False

    def go_on(self, context: PhaseContext) -> bool:
        """Before backward: no stop requested in this batch so far (under DDP every rank agrees first, since
        backward all-reduces — only when something that runs between the last agreement and here could have
        set one: a listener of on_train_batch_start or on_train_batch_loss_end, or a train_step)."""
        if self.distributed and self.stop_can_change():
            context.stop_training = distributed.any_rank_true(context.stop_training, context.device)
        return not context.stop_training

    def check_losses_periodically(self, context: PhaseContext) -> None:
        """After an optimizer step: every ``log_interval`` steps, read the losses (one host sync)."""
        if self.guard.every and context.global_step % self.guard.every == 0:
            self.guard.seen(context, "training")

    def end_of_batch(self, context: PhaseContext, read_losses: bool = False) -> bool:
        """After on_train_batch_end: True when the pass must end here (a stop, a first signal, or, when
        ``read_losses`` (a checkpoint is due), non-finite losses since the last read or non-finite weights),
        agreed by every rank (and, after a signal on any rank, its reason)."""
        if read_losses and not context.stop_training:
            self.guard.checkpointable(context, "a step checkpoint")
        if self.interrupt.requested:
            self.interrupted_now(context)
        if self.distributed:
            self._agree_on_signals(context)
        return bool(context.stop_training)

    def interrupted_now(self, context: PhaseContext) -> None:
        """A signal: the first one seen at a batch's end, or a KeyboardInterrupt that reached the loop (a second
        signal, or one where no handler was installed). The reason is the first signal's."""
        context.stop_training, context.stop_reason = True, self.agreed_reason or self.interrupt.reason
        self.interrupted_pass = self.interrupt.taken = True

    def finite_before(self, context: PhaseContext, what: str) -> bool:
        """The losses since the last read and the weights are finite (else a "nan_loss" stop): checked before a
        checkpoint."""
        return self.guard.checkpointable(context, what)

    def finite_everywhere(self, context: PhaseContext, what: str) -> bool:
        """:meth:`finite_before` agreed by every rank (before a checkpoint every rank takes part in)."""
        return self._on_every_rank(self.finite_before(context, what), context, "loss or weights")

    def epoch_completed(self, context: PhaseContext, metrics: Mapping[str, Any], loss_names: Sequence[str]) -> bool:
        """At the pass's end: False when a stop came during a batch, or the epoch's losses or the weights are not
        finite (then the epoch is neither validated nor checkpointed); otherwise the held stop, if any, is
        applied."""
        if context.stop_training:
            return False
        context.stop_training = self.held
        finite = self.guard.epoch_finite(context, metrics, loss_names) and self.guard.weights_finite(context)
        return self._on_every_rank(finite, context, "weights")  # sharded weights: every rank agrees

    def _on_every_rank(self, finite: bool, context: PhaseContext, what: str) -> bool:
        """Under torchrun: False on every rank when any rank found non-finite values (a "nan_loss" stop there)."""
        if self.distributed and distributed.any_rank_true(not finite, context.device) and finite:
            self.guard.stop(context, f"{what} (on another rank)")
            finite = False
        return finite

    def after_step_validation(self, context: PhaseContext) -> bool:
        """After a point inside the pass where the loop validated (val_check_interval, or max_steps): True when a
        stop was decided there (EarlyStop) on any rank. The pass then ends at this step, and the epoch closes as
        the run's last (test, on_epoch_end): the stop is held like one requested outside a batch."""
        self.agree(context)
        if not context.stop_training:
            return False
        self.held, context.stop_training = True, False
        return True

    # ---- between epochs ----------------------------------------------------------------------------
    def agree(self, context: PhaseContext) -> None:
        """Every rank stops when one does (after validation, where EarlyStop decides). Under DDP a signal that
        came during validation stops every rank here (KeyboardInterrupt), as one process stops in the pass."""
        if self.distributed and self._agree_on_signals(context):
            raise KeyboardInterrupt

    def _agree_on_signals(self, context: PhaseContext) -> bool:
        """Under DDP, one vote: every rank stops when one does; when a signal came on any rank, every rank stops
        for it, with SIGTERM's reason first. True when a signal was agreed."""
        own = self.interrupt.reason if self.interrupt.requested else None
        stop, terminated, interrupted = self.vote.vote(context.stop_training, own == "terminated",
                                                       own == "interrupted")
        context.stop_training = stop
        for reason, came in (("terminated", terminated), ("interrupted", interrupted)):
            if came:
                self.agreed_reason = reason
                self.interrupted_now(context)
                return True
        return False
