"""Learning-rate warmup and schedules as callbacks (SPEC §4), numerically matching SuperGradients 3.7.

Every param group follows its own ``lr0`` (its ``initial_lr``), so ratios between groups are preserved.
Notation: L = optimizer steps per epoch, E = 0-based epoch, b = index of the step just taken within the
epoch, W = lr_warmup_epochs, S = lr_warmup_steps, C = lr_cooldown_epochs, M = max_epochs.
All built-in LR callbacks run at Priority.VERY_HIGH so user callbacks see the lr already set.
"""
from __future__ import annotations

import math
import weakref
from typing import Any, Callable, Dict, List, Optional

import torch

from ..modules import unwrap_model
from ..metrics import lookup_metric
from .base import PHASE_EVENTS, Callback, Phase, PhaseContext, Priority, parse_phase

__all__ = [
    "LinearEpochLRWarmup",
    "LinearBatchLRWarmup",
    "StepLRSchedule",
    "CosineLRSchedule",
    "PolyLRSchedule",
    "ExpLRSchedule",
    "FunctionLRSchedule",
    "TorchSchedulerCallback",
    "set_group_lrs",
    "model_lr_hook",
]


def set_group_lrs(context: PhaseContext, lr_of: Callable[[float], float], from_current: bool = False) -> None:
    """Every param group's lr = lr_of(its lr0) (``from_current``: lr_of(its current lr)). A param group added
    after the optimizer was built (``optimizer.add_param_group``) takes its lr at that moment as its lr0.

    A model with SuperGradients' ``update_param_groups(param_groups, lr, epoch, iter, training_params,
    total_batch)`` sets the groups itself from lr_of(base lr) instead (base lr: ``initial_lr`` when it is a
    number, else the first group's lr0)."""
    optimizer = context.optimizer
    hook = model_lr_hook(context.net)
    if hook is None:
        for group in optimizer.param_groups:
            group["lr"] = lr_of(group["lr"] if from_current else group.setdefault("initial_lr", group["lr"]))
        return
    base = (context.training_params or {}).get("initial_lr")
    if not isinstance(base, (int, float)) or isinstance(base, bool):
        base = optimizer.param_groups[0].setdefault("initial_lr", optimizer.param_groups[0]["lr"])
    groups = hook(optimizer.param_groups, lr_of(float(base)), context.epoch, context.batch_idx,
                  context.training_params, context.steps_per_epoch)
    if groups is not None and groups is not optimizer.param_groups:
        optimizer.param_groups[:] = list(groups)


#: net -> its update_param_groups (or None), looked up once per model: schedules call this every step.
_LR_HOOKS: "weakref.WeakKeyDictionary[Any, Optional[Callable[..., Any]]]" = weakref.WeakKeyDictionary()


def model_lr_hook(net: Any) -> Optional[Callable[..., Any]]:
    """The model's SuperGradients-style ``update_param_groups`` (through DDP/compile wrappers), or None."""
    if net is None:
        return None
    try:
        return _LR_HOOKS[net]
    except KeyError:
        hook = getattr(unwrap_model(net), "update_param_groups", None)
        _LR_HOOKS[net] = hook = hook if callable(hook) else None
        return hook


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
        set_group_lrs(context, lambda lr0: lr0 * factor)

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
        set_group_lrs(context, lambda lr0: float(self.function(
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
        set_group_lrs(context, lambda lr0: lr0 * self.decay_factor ** passed)


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

        set_group_lrs(context, lr)


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

        set_group_lrs(context, lr)


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

    def on_training_start(self, context: PhaseContext) -> None:
        """Create the scheduler over ``context.optimizer``. On a resume the optimizer already holds the
        checkpoint's lrs: the scheduler's constructor (which sets its own first lr) must not change them."""
        lrs = [group["lr"] for group in context.optimizer.param_groups]
        self.scheduler = self.scheduler_cls(context.optimizer, **self.params)
        if self._pending_state is not None:
            self.scheduler.load_state_dict(self._pending_state)
            self._pending_state = None
            for group, lr in zip(context.optimizer.param_groups, lrs):
                group["lr"] = lr

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
