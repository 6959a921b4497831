"""Run an mmcv / mmengine style hook object as a callback (docs/migrating_from_mmcv.md)."""
from __future__ import annotations

import inspect
import logging
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple, Union

from .base import Callback, PhaseContext, Priority

__all__ = ["MMCVHookAdapter", "MMCVHook", "MMCV_PRIORITIES", "MMCV_EVENTS", "RunnerView"]

logger = logging.getLogger("super_trainer")

#: mmcv's priority names; the middle ones equal super_trainer's Priority values.
MMCV_PRIORITIES: Dict[str, int] = {
    "HIGHEST": 0, "VERY_HIGH": int(Priority.VERY_HIGH), "HIGH": int(Priority.HIGH),
    "ABOVE_NORMAL": int(Priority.ABOVE_NORMAL), "NORMAL": int(Priority.NORMAL),
    "BELOW_NORMAL": int(Priority.BELOW_NORMAL), "LOW": int(Priority.LOW), "VERY_LOW": int(Priority.VERY_LOW),
    "LOWEST": 100,
}

#: Our event → the hook methods it calls, first one the hook defines wins (mmcv's base Hook forwards
#: before_train_epoch / before_val_epoch to before_epoch, and the *_iter ones to before_iter / after_iter).
MMCV_EVENTS: Dict[str, Tuple[Tuple[str, ...], ...]] = {
    "on_training_start": (("before_run",), ("before_train",)),
    "on_train_loader_start": (("before_train_epoch", "before_epoch"),),
    "on_train_batch_start": (("before_train_iter", "before_iter"),),
    "on_train_batch_end": (("after_train_iter", "after_iter"),),
    "on_train_loader_end": (("after_train_epoch", "after_epoch"),),
    "on_validation_loader_start": (("before_val",), ("before_val_epoch", "before_epoch")),
    "on_validation_batch_start": (("before_val_iter", "before_iter"),),
    "on_validation_batch_end": (("after_val_iter", "after_iter"),),
    "on_validation_loader_end": (("after_val_epoch", "after_epoch"), ("after_val",)),
    "on_test_loader_start": (("before_test",), ("before_test_epoch",)),
    "on_test_batch_start": (("before_test_iter",),),
    "on_test_batch_end": (("after_test_iter",),),
    "on_test_loader_end": (("after_test_epoch",), ("after_test",)),
    "on_training_end": (("after_train",), ("after_run",)),
}


class RunnerView:
    """The part of an mmcv runner that hooks read, backed by the PhaseContext.

    ``epoch`` (0-based, the running epoch), ``iter`` (0-based index of the train iteration running or just
    run, counting batches, resumes included), ``inner_iter`` (batch index in the epoch), ``max_epochs``,
    ``max_iters``, ``model``, ``optimizer``, ``outputs`` (``{"loss", "log_vars", "num_samples"}`` after a
    train iteration), ``data_batch``, ``rank``, ``world_size``, ``work_dir``, ``logger``, ``meta``,
    ``should_stop`` (setting it True stops training like ``context.stop_training``), ``current_lr()``,
    and ``context`` itself for anything else.
    """

    def __init__(self) -> None:
        self.context: Optional[PhaseContext] = None
        self.iter = 0
        self.max_iters: Optional[int] = None
        self.iters_per_epoch: Optional[int] = None
        self.outputs: Dict[str, Any] = {}
        self.meta: Dict[str, Any] = {}
        self.logger = logger
        self.mode = "train"

    @property
    def epoch(self) -> int:
        return int(self.context.epoch or 0)

    @property
    def inner_iter(self) -> int:
        return int(self.context.batch_idx or 0)

    @property
    def max_epochs(self) -> int:
        return int(self.context.max_epochs)

    @property
    def model(self) -> Any:
        return self.context.net

    @property
    def optimizer(self) -> Any:
        return self.context.optimizer

    @property
    def data_batch(self) -> Any:
        return (self.context.inputs, self.context.target)

    @property
    def rank(self) -> int:
        return int(self.context.rank or 0)

    @property
    def world_size(self) -> int:
        return int(self.context.world_size or 1)

    @property
    def work_dir(self) -> str:
        return str(self.context.ckpt_dir)

    @property
    def data_loader(self) -> Any:
        return self.context.train_loader

    @property
    def should_stop(self) -> bool:
        return bool(self.context.stop_training)

    @should_stop.setter
    def should_stop(self, value: bool) -> None:
        self.context.stop_training = bool(value)

    def current_lr(self) -> List[float]:
        return [group["lr"] for group in self.context.optimizer.param_groups]

    def __getattr__(self, name: str) -> Any:  # only for names not found the normal way
        raise AttributeError(f"runner.{name} is not part of MMCVHookAdapter's runner view (see "
                             "docs/migrating_from_mmcv.md); runner.context is the PhaseContext with everything else")


class MMCVHook:
    """mmcv's ``Hook`` helper methods, for hooks written against ``mmcv.runner.Hook`` when mmcv is not
    installed: replace ``from mmcv.runner import Hook`` by
    ``from super_trainer.callbacks.mmcv_adapter import MMCVHook as Hook``. It defines no hook points (so
    the adapter still receives only the events the subclass implements), only the helpers."""

    @staticmethod
    def every_n_epochs(runner: RunnerView, n: int) -> bool:
        return (runner.epoch + 1) % n == 0 if n > 0 else False

    @staticmethod
    def every_n_inner_iters(runner: RunnerView, n: int) -> bool:
        return (runner.inner_iter + 1) % n == 0 if n > 0 else False

    @staticmethod
    def every_n_iters(runner: RunnerView, n: int) -> bool:
        return (runner.iter + 1) % n == 0 if n > 0 else False

    @staticmethod
    def end_of_epoch(runner: RunnerView) -> bool:
        return runner.iters_per_epoch is not None and runner.inner_iter + 1 == runner.iters_per_epoch

    @staticmethod
    def is_last_epoch(runner: RunnerView) -> bool:
        return runner.epoch + 1 == runner.max_epochs

    @staticmethod
    def is_last_iter(runner: RunnerView) -> bool:
        return runner.max_iters is not None and runner.iter + 1 == runner.max_iters


def _train_batches(context: PhaseContext) -> Optional[int]:
    try:
        batches = len(context.train_loader)
    except TypeError:
        return None
    limit = (context.training_params or {}).get("max_train_batches")
    return min(batches, limit) if limit else batches


def _resolve_mmcv_priority(value: Any) -> int:
    if isinstance(value, str) and value.upper() in MMCV_PRIORITIES:
        return MMCV_PRIORITIES[value.upper()]
    if isinstance(value, int) and not isinstance(value, bool):
        return int(value)
    raise ValueError(f"MMCVHookAdapter priority must be an int or one of {', '.join(MMCV_PRIORITIES)}; got {value!r}")


class MMCVHookAdapter(Callback):
    """Wraps an mmcv / mmengine hook object so it runs at the matching events (table in
    docs/migrating_from_mmcv.md). The hook is used unchanged: its methods receive a :class:`RunnerView`
    (``runner.epoch``, ``runner.iter``, ``runner.model``, ``runner.should_stop = True`` …).

    ``hook`` is the hook object, or (from a recipe) a Hydra ``{_target_: package.HookClass, ...}`` mapping.
    Only the hook methods it defines are called, so the adapter receives only those events. mmengine-style
    methods with ``batch_idx`` / ``data_batch`` / ``outputs`` / ``metrics`` parameters get them by name.
    ``priority``: an mmcv name (HIGHEST, VERY_HIGH, …, LOWEST) or int; default the hook's ``priority``
    attribute, else NORMAL. ``state_dict`` / ``load_state_dict`` of the hook, when it has them, are saved
    in checkpoints under ``state_key`` ("MMCVHookAdapter[<hook class>]").
    """

    def __init__(self, hook: Any, priority: Union[int, str, None] = None) -> None:
        if isinstance(hook, Mapping) and "_target_" in hook:  # from a recipe: {hook: {_target_: pkg.MyHook, ...}}
            from hydra.utils import instantiate

            hook = instantiate(dict(hook))
        self.hook = hook
        given = priority if priority is not None else getattr(hook, "priority", "NORMAL")
        self.priority = _resolve_mmcv_priority(given)
        self.runner = RunnerView()
        self.calls: Dict[str, List[Callable[..., Any]]] = {}
        for event, groups in MMCV_EVENTS.items():
            methods = []
            for names in groups:
                method = next((getattr(hook, n) for n in names if callable(getattr(hook, n, None))), None)
                if method is not None:
                    methods.append(method)
            if methods or event in ("on_training_start",):
                self.calls[event] = methods
                setattr(self, event, self._make_forward(event, methods))
        if callable(getattr(hook, "state_dict", None)) and callable(getattr(hook, "load_state_dict", None)):
            self.state_dict = hook.state_dict  # type: ignore[method-assign]
            self.load_state_dict = hook.load_state_dict  # type: ignore[method-assign]

    @property
    def state_key(self) -> str:
        return f"MMCVHookAdapter[{type(self.hook).__qualname__}]"

    def _make_forward(self, event: str, methods: List[Callable[..., Any]]) -> Callable[[PhaseContext], None]:
        prepared = [(method, _accepted(method)) for method in methods]

        def forward(context: PhaseContext) -> None:
            self._sync(event, context)
            for method, accepted in prepared:
                method(self.runner, **self._kwargs(accepted, context))

        forward.__name__ = event
        return forward

    def _sync(self, event: str, context: PhaseContext) -> None:
        runner = self.runner
        runner.context = context
        if event == "on_training_start":
            batches = _train_batches(context)
            runner.iters_per_epoch = batches
            runner.max_iters = batches * int(context.max_epochs) if batches is not None else None
            max_steps = (context.training_params or {}).get("max_steps")
            if max_steps is not None:  # iterations = optimizer steps x batch_accumulate (windows within epochs)
                by_steps = int(max_steps) * int(context.training_params.get("batch_accumulate", 1))
                runner.max_iters = min(runner.max_iters, by_steps) if runner.max_iters is not None else by_steps
        seen = int(context.batches_seen or 0)
        if event == "on_train_batch_start":
            runner.iter, runner.mode = seen, "train"  # batches_seen counts this batch only at its end
        elif event == "on_train_batch_end":
            runner.iter = seen - 1
            loss = context.loss
            value = float(loss.detach()) if loss is not None and getattr(loss, "numel", lambda: 0)() == 1 else loss
            inputs = context.inputs
            runner.outputs = {"loss": loss, "log_vars": {"loss": value},
                              "num_samples": len(inputs) if hasattr(inputs, "__len__") else None}
        elif event == "on_train_loader_start":
            runner.mode = "train"
        elif event.startswith("on_validation"):
            runner.mode = "val"
        elif event.startswith("on_test"):
            runner.mode = "test"
        elif event in ("on_training_start", "on_train_loader_end", "on_training_end"):
            runner.iter = seen

    def _kwargs(self, accepted: Tuple[str, ...], context: PhaseContext) -> Dict[str, Any]:
        if not accepted:
            return {}
        values = {"batch_idx": context.batch_idx, "data_batch": self.runner.data_batch,
                  "outputs": self.runner.outputs if self.runner.mode == "train" else context.preds,
                  "metrics": context.metrics_dict}
        return {name: values[name] for name in accepted}

    def __repr__(self) -> str:
        return f"MMCVHookAdapter({type(self.hook).__name__})"


def _accepted(method: Callable[..., Any]) -> Tuple[str, ...]:
    """The mmengine keyword arguments ``method`` takes (besides runner)."""
    try:
        parameters = inspect.signature(method).parameters
    except (TypeError, ValueError):
        return ()
    return tuple(name for name in ("batch_idx", "data_batch", "outputs", "metrics") if name in parameters)
