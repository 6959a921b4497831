"""The strict non-finite loss check: every batch, before backward (SPEC §7 "Non-finite loss")."""
from __future__ import annotations

import logging

import torch

from .base import Callback, PhaseContext, Priority

__all__ = ["StopOnNonFiniteLoss"]

logger = logging.getLogger("super_trainer")


class StopOnNonFiniteLoss(Callback):
    """Stops training at the first batch whose loss is NaN or Inf (``stop_reason == "nan_loss"``).

    Checks at on_train_batch_loss_end, before backward: the trainer then skips backward and the optimizer
    step, so the bad batch never reaches the weights (they stay those after the previous batch). Cost: one
    host-device sync per batch (``torch.isfinite(loss)`` is read on the host); the built-in
    ``stop_on_non_finite_loss`` avoids that sync but notices the loss up to ``log_interval`` steps late.
    Runs at VERY_HIGH priority, so later callbacks at that event already see ``stop_training``.
    """

    priority = Priority.VERY_HIGH

    def on_train_batch_loss_end(self, context: PhaseContext) -> None:
        loss = context.loss
        if loss is None or bool(torch.isfinite(loss.detach()).all()):
            return
        logger.warning("non-finite loss %s at epoch %d, batch %d: stopping before backward", loss.detach().item()
                       if loss.numel() == 1 else "", context.epoch, context.batch_idx)
        context.stop_training, context.stop_reason = True, "nan_loss"
