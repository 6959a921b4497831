"""Switch training to a new stage at a given epoch (SuperGradients' TrainingStageSwitchCallbackBase)."""
from __future__ import annotations

from .base import Callback, PhaseContext, Priority

__all__ = ["TrainingStageSwitchCallbackBase"]


class TrainingStageSwitchCallbackBase(Callback):
    """Subclass it and implement ``apply_stage_change(context)``: e.g. set a new ``context.criterion``,
    freeze parameters, change augmentations.

    ``apply_stage_change`` is called once, at on_train_loader_start of epoch ``next_stage_start_epoch``
    (0-based), before that epoch's first batch. A run resumed past the switch epoch (its first epoch is
    greater than ``next_stage_start_epoch``) re-applies it at on_training_start, so the stage change is in
    effect again after a resume. Changes to objects restored from the checkpoint (model weights, optimizer
    state) made by the switch are therefore made again: keep ``apply_stage_change`` idempotent and let it
    change settings, not weights.

    Runs at HIGH priority, so NORMAL callbacks at the same events already see the new stage.
    """

    priority = Priority.HIGH

    def __init__(self, next_stage_start_epoch: int) -> None:
        if isinstance(next_stage_start_epoch, bool) or not isinstance(next_stage_start_epoch, int) \
                or next_stage_start_epoch < 0:
            raise ValueError(f"{type(self).__name__} next_stage_start_epoch must be an int >= 0, "
                             f"got {next_stage_start_epoch!r}")
        self.next_stage_start_epoch = next_stage_start_epoch

    def on_training_start(self, context: PhaseContext) -> None:
        if context.epoch is not None and context.epoch > self.next_stage_start_epoch:
            self.apply_stage_change(context)

    def on_train_loader_start(self, context: PhaseContext) -> None:
        if context.epoch == self.next_stage_start_epoch:
            self.apply_stage_change(context)

    def apply_stage_change(self, context: PhaseContext) -> None:
        """Make the change; ``context.epoch`` is the first epoch of the new stage (or the resumed epoch)."""
        raise NotImplementedError(f"{type(self).__name__} must implement apply_stage_change(context)")
