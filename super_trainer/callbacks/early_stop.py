"""Early stopping on a metric, with SuperGradients' signature and decisions (SPEC §7)."""
from __future__ import annotations

import logging
import math
from typing import Any, Dict, Optional, Union

from ..metrics import lookup_metric
from .base import Phase, PhaseCallback, PhaseContext, Priority, parse_phase

__all__ = ["EarlyStop", "MissingMonitorError"]

logger = logging.getLogger("super_trainer")


class MissingMonitorError(ValueError, RuntimeError):
    """The monitored metric is not in metrics_dict (a RuntimeError in SuperGradients, a ValueError here: both)."""


class EarlyStop(PhaseCallback):
    """Stops training when ``monitor`` stops improving (``stop_reason = "early_stop"``); the epoch that triggers
    it still completes (validation, test, checkpoints).

    Checked at ``phase``: ``Phase.VALIDATION_EPOCH_END`` (on_validation_loader_end, validation metrics) or
    ``Phase.TRAIN_EPOCH_END`` (on_train_loader_end, train metrics); a Phase, its name or "Phase.NAME". Each check
    decides, in this order (as SuperGradients' EarlyStop):

    1. ``check_finite`` and the value is NaN/inf → stop.
    2. ``threshold`` is reached (value < threshold in "min" mode, > in "max") → stop.
    3. The value improves on the best so far by more than ``min_delta`` (absolute) plus ``min_delta_ratio``·|value|
       (relative, as OpenVINO Training Extensions) → new best, the count restarts.
    4. Otherwise one more check without improvement; after ``patience`` of them in a row → stop, provided at least
       ``iteration_patience`` optimizer steps passed since the last improvement (0: no such minimum).

    ``monitor`` is a metrics_dict key; ``metric`` is an alias. Without it the run's metric_to_watch is watched, in
    the direction of greater_metric_to_watch_is_better unless ``mode`` is given (so does ``metric``). ``mode`` is
    "min" or "max" (default "min" when ``monitor`` is named, as in SG). ``strict``: a missing monitor raises
    :class:`MissingMonitorError`; with False it logs a warning and skips the check. ``verbose`` logs every decision.
    Its state (best, checks without improvement, step of the last improvement) is checkpointed.
    """

    priority = Priority.BELOW_NORMAL  # after NORMAL callbacks that may add to metrics_dict
    supported_phases = (Phase.VALIDATION_EPOCH_END, Phase.TRAIN_EPOCH_END)

    def __init__(self, phase: Union[Phase, str] = Phase.VALIDATION_EPOCH_END, monitor: Optional[str] = None,
                 mode: Optional[str] = None, min_delta: float = 0.0, patience: int = 3, check_finite: bool = True,
                 threshold: Optional[float] = None, verbose: bool = False, strict: bool = True,
                 iteration_patience: int = 0, min_delta_ratio: float = 0.0, metric: Optional[str] = None) -> None:
        phase = parse_phase(phase, "EarlyStop phase")
        if phase not in self.supported_phases:
            raise ValueError(f"EarlyStop: phase {phase.value} is not supported; use one of "
                             f"{', '.join(p.value for p in self.supported_phases)}")
        super().__init__(phase)
        if monitor is not None and metric is not None and monitor != metric:
            raise ValueError(f"EarlyStop: monitor={monitor!r} and metric={metric!r} disagree (metric is an alias)")
        if mode not in (None, "min", "max"):
            raise ValueError(f"EarlyStop mode must be 'min' or 'max', got {mode!r}")
        if isinstance(patience, bool) or not isinstance(patience, int) or patience < 1:
            raise ValueError(f"EarlyStop patience must be an int >= 1, got {patience!r}")
        if isinstance(iteration_patience, bool) or not isinstance(iteration_patience, int) or iteration_patience < 0:
            raise ValueError(f"EarlyStop iteration_patience must be an int >= 0, got {iteration_patience!r}")
        if min_delta_ratio < 0:
            raise ValueError(f"EarlyStop min_delta_ratio must be >= 0, got {min_delta_ratio!r}")
        self.monitor = monitor if monitor is not None else metric
        # SG's default mode is "min" for a named monitor; the older `metric` alias and metric_to_watch follow
        # greater_metric_to_watch_is_better (resolved at on_training_start)
        self.mode = mode if mode is not None or monitor is None else "min"
        self.min_delta = float(min_delta)
        self.min_delta_ratio = float(min_delta_ratio)
        self.patience = patience
        self.iteration_patience = iteration_patience
        self.check_finite = check_finite
        self.threshold = threshold
        self.verbose = verbose
        self.strict = strict
        self.best: Optional[float] = None  # None until the first improvement (SG starts from ±inf)
        self.bad_validations = 0  # checks in a row without improvement
        self.last_improvement_step = 0  # global_step at the last improvement

    @property
    def metric(self) -> Optional[str]:
        """Alias of ``monitor``."""
        return self.monitor

    def on_training_start(self, context: PhaseContext) -> None:
        params = context.training_params or {}
        if self.monitor is None:
            self.monitor = context.metric_to_watch
        if self.mode is None:
            self.mode = "max" if params.get("greater_metric_to_watch_is_better", True) else "min"

    def __call__(self, context: PhaseContext) -> None:
        value = lookup_metric(context.metrics_dict or {}, self.monitor)
        if value is None:
            message = (f"EarlyStop: metric {self.monitor!r} is not in metrics_dict; keys: "
                       f"{list(context.metrics_dict or {})}")
            if self.strict:
                raise MissingMonitorError(message)
            logger.warning("%s (strict=False: check skipped)", message)
            return
        value = float(value)
        reason, stop = self._decide(value, int(context.global_step or 0))
        if stop:
            logger.info("EarlyStop: %s; stopping", reason)
            context.stop_training, context.stop_reason = True, "early_stop"
        elif self.verbose:
            logger.info("EarlyStop: %s", reason)

    def _decide(self, value: float, step: int) -> "tuple[str, bool]":
        name, larger = self.monitor, self.mode == "max"
        if self.check_finite and not math.isfinite(value):
            return f"{name} = {value} is not finite (best {self.best})", True
        if self.threshold is not None and (value > self.threshold if larger else value < self.threshold):
            return f"{name} = {value} reached the threshold {self.threshold}", True
        margin = self.min_delta + self.min_delta_ratio * abs(value)
        if larger:
            improved = value - margin > (-math.inf if self.best is None else self.best)
        else:
            improved = value + margin < (math.inf if self.best is None else self.best)
        if improved:
            previous, self.best = self.best, value
            self.bad_validations, self.last_improvement_step = 0, step
            return f"{name} improved to {value} (from {previous})", False
        self.bad_validations += 1
        reason = f"{name} = {value} did not improve on {self.best} for {self.bad_validations} check(s)"
        if self.bad_validations < self.patience:
            return reason, False
        if step - self.last_improvement_step < self.iteration_patience:
            return (f"{reason}, but only {step - self.last_improvement_step} steps since the last improvement "
                    f"(iteration_patience {self.iteration_patience})"), False
        return reason, True

    def state_dict(self) -> Dict[str, Any]:
        return {"best": self.best, "bad_validations": self.bad_validations,
                "last_improvement_step": self.last_improvement_step}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.best = state["best"]
        self.bad_validations = int(state["bad_validations"])
        self.last_improvement_step = int(state.get("last_improvement_step", 0))

    def __repr__(self) -> str:
        return f"EarlyStop({self.phase.value}, monitor={self.monitor!r}, mode={self.mode!r}, patience={self.patience})"
