"""SuperGradients' ``pre_prediction_callback``: a function applied to every train batch before the model sees it."""
from __future__ import annotations

from typing import Any

from ..registry import CALLBACKS
from .base import Callback

__all__ = ["PrePredictionCallback"]


class PrePredictionCallback(Callback):
    """SG's ``pre_prediction_callback``: ``inputs, target = fn(inputs, target, batch_idx)`` on every train batch,
    before any on_train_batch_start handler sees the batch."""

    priority = 0  # before everything, as SG calls it before on_train_batch_start

    def __init__(self, function: Any) -> None:
        try:
            function = CALLBACKS.build(function) if not callable(function) else function
        except ValueError as err:
            raise ValueError(f"training_params.pre_prediction_callback: {err}") from None
        if not callable(function):
            raise ValueError(f"training_params.pre_prediction_callback: {function!r} is not callable "
                             "(fn(inputs, targets, batch_idx) -> (inputs, targets))")
        self.function = function

    def on_train_batch_start(self, context: Any) -> None:
        context.inputs, context.target = self.function(context.inputs, context.target, context.batch_idx)

