"""When the loop validates and tests, and when the run's optimizer steps are used up (SPEC §1, §8 "Steps instead of
epochs").

- By epochs (the default): validation after epoch e when ``(e+1) % run_validation_freq == 0``, at the last epoch,
  or when ``e+1`` is in ``save_ckpt_epoch_list``.
- ``val_check_interval: N`` (an int): after every optimizer step that makes ``global_step`` a multiple of N; a
  float f in (0, 1]: every ``max(1, int(f · steps_per_epoch))`` optimizer steps of each epoch, counted from the
  epoch's start. A validation that falls on an epoch's last batch runs in the epoch-end slot (after
  on_train_loader_end), others inside the train pass, after the batch's on_train_batch_end.
- ``max_steps``: the pass ends after the batch whose step reaches it, even inside an epoch; the run's end is always
  validated (when there is a valid_loader) and tested.

The loop asks after every batch (:meth:`Cadence.in_pass`, one attribute test when neither key is set) and at every
epoch end; it never holds this policy itself.
"""
from __future__ import annotations

from typing import Optional

from ..context import PhaseContext
from ..params import TrainingParams

__all__ = ["Cadence"]


class Cadence:
    """Answers the loop's "is a validation, a test or the run's end due here?"."""

    def __init__(self, params: TrainingParams, has_tests: bool) -> None:
        self.params = params
        self.max_steps: Optional[int] = params.max_steps
        interval = params.val_check_interval
        self.every: Optional[int] = interval if isinstance(interval, int) else None  # global steps
        self.fraction: Optional[float] = interval if isinstance(interval, float) else None  # of each epoch
        self.period = 1  # the running epoch's validation period in steps (fraction mode)
        self.has_tests = has_tests
        self.stepwise = self.max_steps is not None or interval is not None  # anything to check after a batch
        self.checked = -1  # global_step at the last in-pass check (a batch that did not step changes nothing)
        self.validated_in_pass: Optional[int] = None  # global_step of the last validation inside a pass

    def open_epoch(self, steps_per_epoch: Optional[int]) -> None:
        """The running epoch's validation period (fraction mode: a share of this epoch's steps)."""
        if self.fraction is not None and steps_per_epoch:
            self.period = max(1, int(self.fraction * steps_per_epoch))

    def steps_done(self, context: PhaseContext) -> bool:
        """max_steps optimizer steps have been taken: the run ends."""
        return self.max_steps is not None and context.global_step >= self.max_steps

    def in_pass(self, context: PhaseContext, is_last: bool) -> bool:
        """After a batch: True when a validation falls on the step just taken, or it reached max_steps, and the
        batch is not the epoch's last (the epoch end handles that one)."""
        if not self.stepwise or is_last or context.global_step == self.checked:
            return False
        self.checked = context.global_step
        return self.steps_done(context) or self._interval_due(context)

    def validates_in_pass(self, context: PhaseContext) -> bool:
        """At an in-pass point: validate there (the interval's step, or the run's last step)?"""
        due = context.valid_loader is not None
        if due:
            self.validated_in_pass = context.global_step
        return due

    def _interval_due(self, context: PhaseContext) -> bool:
        step = context.global_step
        if self.every is not None:
            return step > 0 and step % self.every == 0
        if self.fraction is not None:
            done = step - context.epoch_start_step
            return done > 0 and done % self.period == 0
        return False

    # ---- at an epoch's end ------------------------------------------------------------------------
    def validation_due(self, context: PhaseContext) -> bool:
        """After the epoch's train pass: validate now? Never twice at one step (a pass that ended at a step it
        validated)."""
        if context.valid_loader is None or self.validated_in_pass == context.global_step:
            return False
        done, params = context.epoch + 1, self.params
        if done == context.max_epochs or self.steps_done(context) or done in params.save_ckpt_epoch_list:
            return True
        if self.every is None and self.fraction is None:
            return done % params.run_validation_freq == 0
        return self._interval_due(context)

    def test_due(self, context: PhaseContext) -> bool:
        """After the epoch's validation: the run's last epoch (or a stop), or every run_test_freq epochs."""
        if not self.has_tests:
            return False
        done, every = context.epoch + 1, self.params.run_test_freq
        last = done == context.max_epochs or context.stop_training or self.steps_done(context)
        return last or (every is not None and done % every == 0)
