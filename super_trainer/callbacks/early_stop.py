"""Early stopping on a validation metric."""
from __future__ import annotations

import math
from typing import Any, Dict, Optional

from ..metrics import lookup_metric
from .base import Callback, PhaseContext, Priority

__all__ = ["EarlyStop"]


class EarlyStop(Callback):
    """Stops training when ``metric`` has not improved by more than ``min_delta`` for ``patience``
    validations in a row (``stop_reason = "early_stop"``); the epoch that triggers it still completes.

    ``metric`` is a metrics_dict key (default: the run's metric_to_watch); ``mode`` is "max" or "min"
    (default: from greater_metric_to_watch_is_better). A non-finite value stops at once when
    ``check_finite`` is True. Its state (best value, validations without improvement) is checkpointed.
    """

    priority = Priority.BELOW_NORMAL  # after NORMAL callbacks that may add to metrics_dict

    def __init__(self, patience: int = 5, min_delta: float = 0.0, metric: Optional[str] = None,
                 mode: Optional[str] = None, check_finite: bool = True) -> None:
        if mode not in (None, "min", "max"):
            raise ValueError(f"EarlyStop mode must be 'min' or 'max', got {mode!r}")
        if patience < 1:
            raise ValueError(f"EarlyStop patience must be >= 1, got {patience!r}")
        self.patience = patience
        self.min_delta = abs(float(min_delta))
        self.metric = metric
        self.mode = mode
        self.check_finite = check_finite
        self.best: Optional[float] = None
        self.bad_validations = 0

    def on_training_start(self, context: PhaseContext) -> None:
        params = context.training_params or {}
        if self.metric is None:
            self.metric = context.metric_to_watch
        if self.mode is None:
            self.mode = "max" if params.get("greater_metric_to_watch_is_better", True) else "min"

    def on_validation_loader_end(self, context: PhaseContext) -> None:
        value = lookup_metric(context.metrics_dict or {}, self.metric)
        if value is None:
            raise ValueError(f"EarlyStop: metric {self.metric!r} is not in metrics_dict; keys: "
                             f"{list(context.metrics_dict or {})}")
        value = float(value)
        if not math.isfinite(value):
            if self.check_finite:
                context.stop_training, context.stop_reason = True, "early_stop"
            return
        improved = self.best is None or (
            value > self.best + self.min_delta if self.mode == "max" else value < self.best - self.min_delta)
        if improved:
            self.best, self.bad_validations = value, 0
            return
        self.bad_validations += 1
        if self.bad_validations >= self.patience:
            context.stop_training, context.stop_reason = True, "early_stop"

    def state_dict(self) -> Dict[str, Any]:
        return {"best": self.best, "bad_validations": self.bad_validations}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.best = state["best"]
        self.bad_validations = int(state["bad_validations"])
