"""Reduce the learning rate when a validation metric stops improving, with OTX's iteration_patience."""
from __future__ import annotations

import logging
import math
import warnings
from typing import Any, Dict, Optional

from ..metrics import lookup_metric
from .base import Callback, PhaseContext, Priority
from .lr import model_lr_hook, set_group_lrs

__all__ = ["ReduceLROnPlateauCallback"]

logger = logging.getLogger("super_trainer")


class ReduceLROnPlateauCallback(Callback):
    """Multiplies every param group's lr by ``factor`` (never below ``min_lr``) once ``monitor`` has not
    improved for ``patience`` validations in a row AND at least ``iteration_patience`` optimizer steps have
    been taken since the last improvement (or the last reduction) — OTX's ReduceLROnPlateauLrUpdaterHook.

    Fires at on_validation_loader_end at LOW priority, so it sees metrics that NORMAL callbacks add to
    metrics_dict at that event. The new lr applies from the next optimizer step.

    - ``monitor``: a metrics_dict key (case-insensitive); default: the run's metric_to_watch.
    - ``mode``: "min" or "max"; default: from greater_metric_to_watch_is_better.
    - ``threshold`` / ``threshold_mode``: an improvement must beat the best by more than
      ``best·threshold`` ("rel") or ``threshold`` ("abs"), as in torch's ReduceLROnPlateau.
    - ``cooldown``: validations after a reduction during which bad validations are not counted.
    - Unlike torch's ReduceLROnPlateau (which reduces on the ``patience+1``-th bad epoch), the reduction
      comes on the ``patience``-th bad validation, as in OTX and EarlyStop.

    A model with SuperGradients' ``update_param_groups`` sets the lrs itself: it is called with the base lr
    ``initial_lr · factor^reductions`` (not below ``min_lr``), as the other LR callbacks do.
    A non-finite value counts as "not improved". The state (best, bad count, cooldown, last step) is
    checkpointed and restored on resume.
    """

    priority = Priority.LOW

    def __init__(self, monitor: Optional[str] = None, mode: Optional[str] = None, factor: float = 0.1,
                 patience: int = 3, iteration_patience: int = 0, cooldown: int = 0, min_lr: float = 0.0,
                 threshold: float = 1e-4, threshold_mode: str = "rel") -> None:
        if mode not in (None, "min", "max"):
            raise ValueError(f"ReduceLROnPlateauCallback mode must be 'min' or 'max', got {mode!r}")
        if threshold_mode not in ("rel", "abs"):
            raise ValueError(f"ReduceLROnPlateauCallback threshold_mode must be 'rel' or 'abs', got {threshold_mode!r}")
        if not 0.0 < float(factor) < 1.0:
            raise ValueError(f"ReduceLROnPlateauCallback factor must be in (0, 1), got {factor!r}")
        for name, value in (("patience", patience), ("iteration_patience", iteration_patience), ("cooldown", cooldown)):
            if isinstance(value, bool) or not isinstance(value, int) or value < (1 if name == "patience" else 0):
                raise ValueError(f"ReduceLROnPlateauCallback {name} must be an int >= "
                                 f"{1 if name == 'patience' else 0}, got {value!r}")
        self.monitor = monitor
        self.mode = mode
        self.factor = float(factor)
        self.patience = patience
        self.iteration_patience = iteration_patience
        self.cooldown = cooldown
        self.min_lr = float(min_lr)
        self.threshold = float(threshold)
        self.threshold_mode = threshold_mode
        self.best: Optional[float] = None
        self.bad_validations = 0
        self.cooldown_left = 0
        self.last_reset_step = 0  # global_step of the last improvement or reduction
        self.reductions = 0

    def on_training_start(self, context: PhaseContext) -> None:
        lr_mode = (context.training_params or {}).get("lr_mode")
        if lr_mode is not None:
            warnings.warn(f"ReduceLROnPlateauCallback: lr_mode {lr_mode!r} also sets the lr and will overwrite its "
                          "reductions; use it with lr_mode None (warmup is fine)", stacklevel=2)
        if self.monitor is None:
            self.monitor = context.metric_to_watch
        if self.mode is None:
            better = (context.training_params or {}).get("greater_metric_to_watch_is_better", True)
            self.mode = "max" if better else "min"

    def _improved(self, value: float) -> bool:
        if self.best is None:
            return True
        if self.threshold_mode == "rel":
            margin = abs(self.best) * self.threshold
        else:
            margin = self.threshold
        return value > self.best + margin if self.mode == "max" else value < self.best - margin

    def on_validation_loader_end(self, context: PhaseContext) -> None:
        value = lookup_metric(context.metrics_dict or {}, self.monitor)
        if value is None:
            raise ValueError(f"ReduceLROnPlateauCallback: monitor {self.monitor!r} is not in metrics_dict; keys: "
                             f"{list(context.metrics_dict or {})}")
        value = float(value)
        step = int(context.global_step or 0)
        if math.isfinite(value) and self._improved(value):
            self.best, self.bad_validations, self.last_reset_step = value, 0, step
            return
        if self.cooldown_left > 0:
            self.cooldown_left -= 1
            return
        self.bad_validations += 1
        if self.bad_validations < self.patience:
            return
        if step - self.last_reset_step < self.iteration_patience:
            logger.info("ReduceLROnPlateauCallback: %d bad validations but only %d of %d steps since the last "
                        "improvement; lr kept", self.bad_validations, step - self.last_reset_step,
                        self.iteration_patience)
            return
        self.reductions += 1
        self._reduce(context)
        self.bad_validations, self.cooldown_left, self.last_reset_step = 0, self.cooldown, step
        logger.info("ReduceLROnPlateauCallback: %s did not improve; lr now %s", self.monitor,
                    [g["lr"] for g in context.optimizer.param_groups])

    def _reduce(self, context: PhaseContext) -> None:
        if model_lr_hook(context.net) is None:
            set_group_lrs(context, lambda lr: max(lr * self.factor, self.min_lr), from_current=True)
        else:  # a model with SuperGradients' update_param_groups sets the groups' lrs from one base lr
            set_group_lrs(context, lambda lr0: max(lr0 * self.factor ** self.reductions, self.min_lr))

    def state_dict(self) -> Dict[str, Any]:
        return {"best": self.best, "bad_validations": self.bad_validations, "cooldown_left": self.cooldown_left,
                "last_reset_step": self.last_reset_step, "reductions": self.reductions}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.best = state["best"]
        self.bad_validations = int(state["bad_validations"])
        self.cooldown_left = int(state["cooldown_left"])
        self.last_reset_step = int(state["last_reset_step"])
        self.reductions = int(state.get("reductions", 0))
