"""EMA update after every optimizer step (after every train batch that made an update, with several optimizers)."""
from __future__ import annotations

from typing import Optional

from .base import Callback, PhaseContext, Priority

__all__ = ["EMAUpdate"]


class EMAUpdate(Callback):
    """Blends the trained weights into ``context.ema_model`` (a ModelEMA) after each optimizer step
    (copies them while ``global_step <= ema_params.start_step``; averages every ``ema_params.interval`` steps).

    ``per_batch`` (several optimizers, SPEC §8): once per train batch that made at least one update, at
    on_train_batch_end, after the batch's last optimizer step (a GAN's generator and discriminator steps count as
    one EMA step, as ``global_step`` counts them).

    Runs at HIGH priority, so NORMAL callbacks at on_train_batch_gradient_step_end (or on_train_batch_end) see the
    updated EMA.
    """

    priority = Priority.HIGH

    def __init__(self, total_steps: int, per_batch: bool = False) -> None:
        self.total_steps = total_steps
        self.per_batch = per_batch
        self.last_step = 0  # global_step at the last update (per_batch)
        if per_batch:  # the instance attribute shadows the step-end method, so the handler routes the batch end
            self.on_train_batch_gradient_step_end = Callback.on_train_batch_gradient_step_end.__get__(self)
            self.on_train_batch_end = self._after_batch

    def set_horizon(self, max_epochs: int, steps_per_epoch: int, total_steps: Optional[int] = None) -> bool:
        """A per-epoch setting changed the run's length (SPEC §8): total_steps follows (max_steps may cap it). True
        if it changed."""
        total = total_steps if total_steps is not None else max_epochs * steps_per_epoch
        changed, self.total_steps = total != self.total_steps, total
        return changed

    def on_training_start(self, context: PhaseContext) -> None:
        self.last_step = context.global_step  # a resume continues from the checkpoint's

    def on_train_batch_gradient_step_end(self, context: PhaseContext) -> None:
        context.ema_model.step(context.net, step=context.global_step, total_steps=self.total_steps)

    def _after_batch(self, context: PhaseContext) -> None:
        if context.global_step != self.last_step:  # the batch made at least one update
            self.last_step = context.global_step
            context.ema_model.step(context.net, step=context.global_step, total_steps=self.total_steps)
