"""EMA update after every optimizer step."""
from __future__ import annotations

from .base import Callback, PhaseContext, Priority

__all__ = ["EMAUpdate"]


class EMAUpdate(Callback):
    """Blends the trained weights into ``context.ema_model`` (a ModelEMA) after each optimizer step
    (copies them while ``global_step <= ema_params.start_step``; averages every ``ema_params.interval`` steps).

    Runs at HIGH priority, so NORMAL callbacks at on_train_batch_gradient_step_end see the updated EMA.
    """

    priority = Priority.HIGH

    def __init__(self, total_steps: int) -> None:
        self.total_steps = total_steps

    def on_train_batch_gradient_step_end(self, context: PhaseContext) -> None:
        context.ema_model.step(context.net, step=context.global_step, total_steps=self.total_steps)
