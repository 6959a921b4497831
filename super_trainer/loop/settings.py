"""Per-epoch settings (SPEC §8): what a callback may change between epochs and when it takes effect.

Values written in ``on_train_loader_start`` — ``training_params.batch_accumulate``, ``context.train_loader``,
``context.max_epochs`` / ``training_params.max_epochs`` — take effect for that epoch; written elsewhere, from the
next epoch. The loop calls :meth:`EpochSettings.apply` before and after ``on_train_loader_start``: each time the
batch count, the optimizer steps per epoch, ``total_steps`` and the horizons of the schedules (every callback with a
``set_horizon(max_epochs, steps_per_epoch)`` method: the LR schedules, batch warmup over epochs, EMA) are recomputed,
with one warning naming the callbacks whose horizon changed.
"""
from __future__ import annotations

import warnings
from typing import Any, List, Optional, Tuple

from ..batches import count_batches, optimizer_steps_per_epoch
from ..optimizers import step_takes_closure
from ..params_runs import run_horizon
from .parts import RunParts

__all__ = ["EpochSettings"]


class EpochSettings:
    """Owns the run's length and shape: max_epochs, batch_accumulate, the train loader's batch count."""

    def __init__(self, parts: RunParts) -> None:
        self.parts, self.context, self.params = parts, parts.context, parts.params
        self.max_epochs = int(self.params.max_epochs)  # the value both places held at the last check
        self.accumulate = int(self.params.batch_accumulate)
        self.loader: Any = None  # the train loader counted last, and its batches per epoch
        self.n_batches: Optional[int] = None
        self.horizon: Tuple[Optional[int], int, Optional[int]] = (self.context.steps_per_epoch, self.max_epochs,
                                                                  self.context.total_steps)

    def current_max_epochs(self) -> int:
        """``context.max_epochs`` or ``training_params.max_epochs``, whichever a callback changed (the context's
        when both), written back to both."""
        context, params = self.context, self.params
        written = context.max_epochs if context.max_epochs != self.max_epochs else params.get("max_epochs")
        if written != self.max_epochs:
            if isinstance(written, bool) or not isinstance(written, int) or written < 1:
                raise ValueError(f"context.max_epochs / training_params.max_epochs: must be an int >= 1, got {written!r}")
            low = int(params.get("lr_warmup_epochs") or 0) + int(params.get("lr_cooldown_epochs") or 0)
            if written < low:
                raise ValueError(f"training_params.max_epochs: {written} is shorter than lr_warmup_epochs plus "
                                 f"lr_cooldown_epochs ({low})")
            self.max_epochs = written
        context.max_epochs = params["max_epochs"] = self.max_epochs
        return self.max_epochs

    def apply(self) -> Tuple[Optional[int], int]:
        """The settings in effect for the running epoch's pass: (its batch count, its batch_accumulate)."""
        max_epochs = self.current_max_epochs()
        accumulate = self._accumulate()
        loader = self.context.train_loader
        if loader is not self.loader:
            self.n_batches = count_batches(loader, self.params.max_train_batches)
            if self.n_batches == 0:
                raise ValueError("context.train_loader: the new train loader has no batches (len() == 0)")
            self.loader = loader
        steps = optimizer_steps_per_epoch(self.params, self.n_batches)
        total = run_horizon(self.params, steps)  # steps_per_epoch · max_epochs, capped by max_steps
        self.context.trainer_update(steps_per_epoch=steps, total_steps=total)
        if steps is not None and (steps, max_epochs, total) != self.horizon:
            self._new_horizon(steps, max_epochs, total)
        return self.n_batches, accumulate

    def _accumulate(self) -> int:
        value = self.params.get("batch_accumulate")
        if value == self.accumulate:
            return value
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"training_params.batch_accumulate: must be an int >= 1, got {value!r}")
        optimizer = self.parts.optimizer
        if value > 1 and step_takes_closure(optimizer):
            raise ValueError(f"training_params.batch_accumulate: {type(optimizer).__name__}.step recomputes the loss "
                             "of the current batch through a closure, so it cannot accumulate")
        self.accumulate = value
        return value

    def _new_horizon(self, steps: int, max_epochs: int, total: Optional[int]) -> None:
        old_steps, old_epochs, _ = self.horizon
        self.horizon = (steps, max_epochs, total)
        changed: List[str] = []
        for callback in self.parts.callbacks.callbacks:
            set_horizon = getattr(callback, "set_horizon", None)
            if callable(set_horizon) and set_horizon(max_epochs=max_epochs, steps_per_epoch=steps, total_steps=total):
                changed.append(type(callback).__name__)
        if changed:
            warnings.warn(f"epoch {self.context.epoch}: the run is now {max_epochs} epochs of {steps} optimizer steps "
                          f"(was {old_epochs} of {old_steps}); the horizons of {', '.join(changed)} were recomputed, "
                          "so their curves change from here", stacklevel=2)
