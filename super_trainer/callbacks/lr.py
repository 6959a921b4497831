"""Learning-rate warmup and schedules as callbacks (SPEC §4), numerically matching SuperGradients 3.7.

Every param group follows its own ``lr0`` (its ``initial_lr``), so ratios between groups are preserved.
Notation: L = optimizer steps per epoch, E = 0-based epoch, b = index of the step just taken within the
epoch, W = lr_warmup_epochs, S = lr_warmup_steps, C = lr_cooldown_epochs, M = max_epochs.
All built-in LR callbacks run at Priority.VERY_HIGH so user callbacks see the lr already set.
"""
from __future__ import annotations

import inspect
import math
import warnings
from typing import Any, Callable, Dict, List, Mapping, Optional

import torch

from ..checkpoint import unwrap_model
from ..metrics import lookup_metric
from .base import PHASE_EVENTS, Callback, Phase, PhaseContext, Priority, parse_phase
from .yolo_warmup import YoloV5LRWarmup

__all__ = [
    "LR_MODES",
    "WARMUP_MODES",
    "LinearEpochLRWarmup",
    "LinearBatchLRWarmup",
    "StepLRSchedule",
    "CosineLRSchedule",
    "PolyLRSchedule",
    "ExpLRSchedule",
    "FunctionLRSchedule",
    "TorchSchedulerCallback",
    "build_lr_callbacks",
    "normalize_lr_mode",
    "normalize_warmup_mode",
]


def _set_lrs(context: PhaseContext, scale: Callable[[float], float]) -> None:
    """Every param group's lr = scale(its lr0). A model with SuperGradients' ``update_param_groups(param_groups,
    lr, epoch, iter, training_params, total_batch)`` sets them itself from the base lr instead."""
    optimizer = context.optimizer
    hook = _update_param_groups_hook(context)
    if hook is None:
        for group in optimizer.param_groups:
            group["lr"] = scale(group["initial_lr"])
        return
    base = (context.training_params or {}).get("initial_lr")
    if not isinstance(base, (int, float)) or isinstance(base, bool):
        base = optimizer.param_groups[0]["initial_lr"]
    groups = hook(optimizer.param_groups, scale(float(base)), context.epoch, context.batch_idx,
                  context.training_params, context.steps_per_epoch)
    if groups is not None and groups is not optimizer.param_groups:
        optimizer.param_groups[:] = list(groups)


def _update_param_groups_hook(context: PhaseContext) -> Optional[Callable[..., Any]]:
    """The model's ``update_param_groups``, looked up once per run (cached on the context)."""
    cached = context.__dict__.get("_update_param_groups_hook", _UNSET)
    if cached is _UNSET:
        net = unwrap_model(context.net) if context.net is not None else None
        cached = getattr(net, "update_param_groups", None) if net is not None else None
        cached = cached if callable(cached) else None
        context.__dict__["_update_param_groups_hook"] = cached
    return cached


_UNSET = object()


class _Schedule(Callback):
    priority = Priority.VERY_HIGH

    def __init__(self, max_epochs: int, steps_per_epoch: int, warmup_epochs: int = 0, warmup_steps: int = 0,
                 cooldown_epochs: int = 0) -> None:
        self.max_epochs = max_epochs
        self.steps_per_epoch = steps_per_epoch
        self.warmup_epochs = warmup_epochs
        self.warmup_steps = warmup_steps
        self.cooldown_epochs = cooldown_epochs

    def _active(self, context: PhaseContext) -> bool:
        epoch = context.epoch
        return (self.warmup_epochs <= epoch < self.max_epochs - self.cooldown_epochs
                and context.global_step >= self.warmup_steps)


class _StepwiseSchedule(_Schedule):
    """Updates the lr after each optimizer step, so step k uses the value computed after step k-1."""

    def on_train_batch_gradient_step_end(self, context: PhaseContext) -> None:
        if not self._active(context):
            return
        step_in_epoch = context.global_step - 1 - context.epoch_start_step  # b: index of the step just taken
        factor = self.factor(context.epoch - self.warmup_epochs, step_in_epoch)
        _set_lrs(context, lambda lr0: lr0 * factor)

    def factor(self, epoch: int, step: int) -> float:  # pragma: no cover - abstract
        raise NotImplementedError


class CosineLRSchedule(_StepwiseSchedule):
    """lr = lr0·(0.5·(1 + cos(π·it/(T+1)))·(1−r) + r), it = max(0, L·(E−W) + b − S), T = L·(M−W−C) − S."""

    def __init__(self, *args: Any, final_lr_ratio: float = 0.01, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.final_lr_ratio = final_lr_ratio

    def factor(self, epoch: int, step: int) -> float:
        L = self.steps_per_epoch
        it = max(0, L * epoch + step - self.warmup_steps)
        total = L * (self.max_epochs - self.warmup_epochs - self.cooldown_epochs) - self.warmup_steps
        r = self.final_lr_ratio
        return 0.5 * (1.0 + math.cos(math.pi * it / (total + 1))) * (1.0 - r) + r


class PolyLRSchedule(_StepwiseSchedule):
    """lr = lr0·(1 − it/T)^0.9, it = L·(E−W) + b, T = L·(M−W−C)."""

    def factor(self, epoch: int, step: int) -> float:
        L = self.steps_per_epoch
        it = L * epoch + step
        total = L * (self.max_epochs - self.warmup_epochs - self.cooldown_epochs)
        return max(0.0, 1.0 - it / total) ** 0.9


class ExpLRSchedule(_StepwiseSchedule):
    """lr = lr0·f^((L·(E−W) + b)/L)."""

    def __init__(self, *args: Any, decay_factor: float = 0.1, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.decay_factor = decay_factor

    def factor(self, epoch: int, step: int) -> float:
        L = self.steps_per_epoch
        return self.decay_factor ** ((L * epoch + step) / L)


class FunctionLRSchedule(_StepwiseSchedule):
    """lr = fn(initial_lr=lr0, epoch=E−W, iter=b, max_epoch=M−W−C, iters_per_epoch=L)."""

    def __init__(self, *args: Any, function: Callable[..., float], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.function = function

    def on_train_batch_gradient_step_end(self, context: PhaseContext) -> None:
        if not self._active(context):
            return
        step_in_epoch = context.global_step - 1 - context.epoch_start_step
        max_epoch = self.max_epochs - self.warmup_epochs - self.cooldown_epochs
        epoch = context.epoch - self.warmup_epochs
        _set_lrs(context, lambda lr0: float(self.function(
            initial_lr=lr0, epoch=epoch, iter=step_in_epoch, max_epoch=max_epoch,
            iters_per_epoch=self.steps_per_epoch)))


class StepLRSchedule(_Schedule):
    """At on_train_loader_end of epoch E ≥ W: lr = lr0·f^(#{u in lr_updates : u ≤ E}) (u may be fractional, as SG's
    recipes write them: 2.4 takes effect from epoch 4)."""

    def __init__(self, *args: Any, lr_updates: List[float], decay_factor: float = 0.1, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.lr_updates = sorted(lr_updates)
        self.decay_factor = decay_factor

    def on_train_loader_end(self, context: PhaseContext) -> None:
        if context.epoch < self.warmup_epochs:
            return
        passed = sum(1 for u in self.lr_updates if u <= context.epoch)
        _set_lrs(context, lambda lr0: lr0 * self.decay_factor ** passed)


class LinearEpochLRWarmup(Callback):
    """At on_train_loader_start of epoch E ≤ W: lr = w0 + E·(lr0 − w0)/W; w0 defaults to lr0/(W+1)."""

    priority = Priority.VERY_HIGH

    def __init__(self, warmup_epochs: int, warmup_initial_lr: Optional[float] = None) -> None:
        self.warmup_epochs = warmup_epochs
        self.warmup_initial_lr = warmup_initial_lr

    def on_train_loader_start(self, context: PhaseContext) -> None:
        epoch, W = context.epoch, self.warmup_epochs
        if W <= 0 or epoch > W:
            return

        def lr(lr0: float) -> float:
            w0 = lr0 / (W + 1) if self.warmup_initial_lr is None else self.warmup_initial_lr
            return w0 + epoch * (lr0 - w0) / W

        _set_lrs(context, lr)


class LinearBatchLRWarmup(Callback):
    """At on_train_batch_start while global step g < S: lr = w0 + g·(lr0 − w0)/(S − 1); w0 defaults to lr0/(S+1)."""

    priority = Priority.VERY_HIGH

    def __init__(self, warmup_steps: int, warmup_initial_lr: Optional[float] = None) -> None:
        self.warmup_steps = warmup_steps
        self.warmup_initial_lr = warmup_initial_lr

    def on_train_batch_start(self, context: PhaseContext) -> None:
        g, S = context.global_step, self.warmup_steps
        if g >= S:
            return

        def lr(lr0: float) -> float:
            w0 = lr0 / (S + 1) if self.warmup_initial_lr is None else self.warmup_initial_lr
            return w0 if S == 1 else w0 + g * (lr0 - w0) / (S - 1)

        _set_lrs(context, lr)


class TorchSchedulerCallback(Callback):
    """Steps a ``torch.optim.lr_scheduler`` scheduler at one phase; its state goes into checkpoints.

    ``ReduceLROnPlateau`` is stepped with ``metrics_dict[metric_name]`` (default phase VALIDATION_EPOCH_END).
    A scheduler stepped with a metric runs at LOW priority (others VERY_HIGH), so it sees metrics that
    NORMAL callbacks add to metrics_dict at the same event.
    """

    priority = Priority.VERY_HIGH

    def __init__(self, scheduler_cls: type, params: Dict[str, Any], phase: Any = None,
                 metric_name: Optional[str] = None) -> None:
        self.scheduler_cls = scheduler_cls
        self.params = params
        self.metric_name = metric_name
        needs_metric = issubclass(scheduler_cls, torch.optim.lr_scheduler.ReduceLROnPlateau)
        if needs_metric and not metric_name:
            raise ValueError("training_params.lr_mode: ReduceLROnPlateau needs metric_name (a metrics_dict key)")
        default_phase = Phase.VALIDATION_EPOCH_END if needs_metric else Phase.TRAIN_EPOCH_END
        self.phase = default_phase if phase is None else parse_phase(phase, "training_params.lr_mode phase")
        if metric_name is not None:
            self.priority = Priority.LOW  # after NORMAL callbacks that add metrics at the same event
        self.scheduler: Optional[Any] = None
        self._pending_state: Optional[Dict[str, Any]] = None
        setattr(self, PHASE_EVENTS[self.phase], self._step)

    @property
    def state_key(self) -> str:
        return f"TorchSchedulerCallback[{self.scheduler_cls.__name__}]"

    def attach(self, optimizer: torch.optim.Optimizer) -> None:
        """Create the scheduler over ``optimizer`` (before training starts)."""
        self.scheduler = self.scheduler_cls(optimizer, **self.params)
        if self._pending_state is not None:
            self.scheduler.load_state_dict(self._pending_state)
            self._pending_state = None

    def _step(self, context: PhaseContext) -> None:
        if self.metric_name is not None:
            value = lookup_metric(context.metrics_dict or {}, self.metric_name)
            if value is None:
                raise ValueError(f"lr scheduler metric_name {self.metric_name!r} is not in metrics_dict; "
                                 f"keys: {list(context.metrics_dict or {})}")
            self.scheduler.step(value)
        else:
            self.scheduler.step()

    def state_dict(self) -> Dict[str, Any]:
        return self.scheduler.state_dict() if self.scheduler is not None else {}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        if self.scheduler is None:
            self._pending_state = state
        else:
            self.scheduler.load_state_dict(state)


LR_MODES: Dict[str, str] = {
    "step": "step", "steplrscheduler": "step", "step_lr": "step",
    "cosine": "cosine", "cosinelrscheduler": "cosine",
    "poly": "poly", "polylrscheduler": "poly",
    "exp": "exp", "exponentiallrscheduler": "exp", "explrscheduler": "exp",
    "function": "function", "functionlrscheduler": "function",
}

WARMUP_MODES: Dict[str, str] = {
    "linear_epoch_step": "linear_epoch_step", "linearepochlrwarmup": "linear_epoch_step",
    "warmup_linear_epoch": "linear_epoch_step", "linear_epoch": "linear_epoch_step",
    "linear_batch_step": "linear_batch_step", "linearbatchlrwarmup": "linear_batch_step",
    "warmup_linear_step": "linear_batch_step", "linear_step": "linear_batch_step",
    "yolov5_warmup": "yolov5_warmup", "yolov5warmuplrcallback": "yolov5_warmup",  # SG 2.x; see callbacks/yolo_warmup.py
}


def normalize_lr_mode(value: Any) -> Any:
    """Canonical lr_mode name, a torch scheduler mapping unchanged, or ValueError listing valid modes."""
    if value is None or isinstance(value, Mapping):
        return value
    key = str(value).lower()
    if key in LR_MODES:
        return LR_MODES[key]
    valid = "None, 'step', 'poly', 'cosine', 'exp', 'function' or {TorchScheduler: {params}}"
    raise ValueError(f"training_params.lr_mode: unknown value {value!r}; valid: {valid}")


def normalize_warmup_mode(value: Any) -> Optional[str]:
    if value is None:
        return None
    key = str(value).lower()
    if key in WARMUP_MODES:
        return WARMUP_MODES[key]
    raise ValueError(
        f"training_params.warmup_mode: unknown value {value!r}; valid: 'linear_epoch_step', 'linear_batch_step', "
        "'yolov5_warmup'"
    )


def build_lr_callbacks(params: Mapping[str, Any], steps_per_epoch: int) -> List[Callback]:
    """The warmup and schedule callbacks that ``training_params`` asks for (empty for a constant lr)."""
    callbacks: List[Callback] = []
    W = int(params.get("lr_warmup_epochs") or 0)
    S = int(params.get("lr_warmup_steps") or 0)
    C = int(params.get("lr_cooldown_epochs") or 0)
    M = int(params["max_epochs"])
    warmup_mode = normalize_warmup_mode(params.get("warmup_mode"))
    if warmup_mode is None and (W > 0 or S > 0):
        warmup_mode = "linear_epoch_step" if W > 0 else "linear_batch_step"
    if warmup_mode == "linear_epoch_step" and W > 0:
        callbacks.append(LinearEpochLRWarmup(W, params.get("warmup_initial_lr")))
    elif warmup_mode == "linear_batch_step" and (S > 0 or W > 0):
        callbacks.append(LinearBatchLRWarmup(S if S > 0 else W * steps_per_epoch, params.get("warmup_initial_lr")))
    elif warmup_mode == "yolov5_warmup" and W > 0:
        callbacks.append(YoloV5LRWarmup(W, params.get("warmup_momentum"), params.get("warmup_bias_lr")))
    if S > steps_per_epoch * M:
        warnings.warn(f"training_params.lr_warmup_steps={S} exceed the run's {steps_per_epoch * M} optimizer steps: this "
                      "run ends before the lr schedule starts (fine for a smoke run of a longer recipe)", stacklevel=3)

    mode = normalize_lr_mode(params.get("lr_mode"))
    common = dict(max_epochs=M, steps_per_epoch=steps_per_epoch, warmup_epochs=W, warmup_steps=S,
                  cooldown_epochs=C)
    decay = float(params["lr_decay_factor"])
    if mode is None:
        pass
    elif isinstance(mode, Mapping):
        callbacks.append(_torch_scheduler(mode))
    elif mode == "cosine":
        callbacks.append(CosineLRSchedule(**common, final_lr_ratio=float(params["cosine_final_lr_ratio"])))
    elif mode == "poly":
        callbacks.append(PolyLRSchedule(**common))
    elif mode == "exp":
        callbacks.append(ExpLRSchedule(**common, decay_factor=decay))
    elif mode == "function":
        function = params.get("lr_schedule_function")
        if not callable(function):
            raise ValueError("training_params.lr_schedule_function must be a callable when lr_mode is 'function'")
        callbacks.append(FunctionLRSchedule(**common, function=function))
    elif mode == "step":
        updates = params.get("lr_updates") or []
        callbacks.append(StepLRSchedule(**common, lr_updates=list(updates), decay_factor=decay))
    return callbacks


def _torch_scheduler(mode: Mapping[str, Any]) -> TorchSchedulerCallback:
    from ..registry import parse_spec

    name, params = parse_spec(mode, "lr scheduler")
    scheduler_cls = getattr(torch.optim.lr_scheduler, str(name), None)
    if not (inspect.isclass(scheduler_cls) and name[0].isupper()):
        from ..registry import close_matches

        names = [n for n, v in vars(torch.optim.lr_scheduler).items() if inspect.isclass(v) and n.endswith(("LR", "Plateau"))]
        hint = close_matches(str(name), names)
        raise ValueError(f"training_params.lr_mode: unknown torch scheduler {name!r}"
                         + (f"; did you mean {' or '.join(map(repr, hint))}?" if hint else ""))
    params = dict(params)
    phase = params.pop("phase", None)
    metric_name = params.pop("metric_name", None)
    return TorchSchedulerCallback(scheduler_cls, params, phase=phase, metric_name=metric_name)
