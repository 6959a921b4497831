"""Any model, any loop (SPEC §8): resolving ``training_params.batch_adapter`` and ``training_params.train_step`` (or a
model's own ``train_step`` method), and the criterion that reads a model's own loss (``loss: null`` / ``"model"``).

A ``train_step(context)`` replaces forward + criterion for training and returns ``loss``, ``(loss, components)`` or
``{name: loss}``. The trainer still does backward, accumulation, mixed precision, clipping, DDP and the optimizer
step, and fires every event; with several optimizers the step updates them itself through
``context.optimizers[name].update(loss)`` (``loop/optimizers.py``).
"""
from __future__ import annotations

import functools
import importlib
import inspect
from typing import Any, Callable, Mapping, Optional

import torch
import torch.nn as nn

from .batches import BatchReader
from .registry import Registry, parse_spec

__all__ = ["BATCH_ADAPTERS", "ModelOwnLoss", "uses_model_loss", "resolve_callable", "build_batch_reader",
           "resolve_train_step"]

#: Batch adapters by name, for recipes: ``batch_adapter: my_adapter`` after ``@BATCH_ADAPTERS.register``.
BATCH_ADAPTERS = Registry("batch adapter")


def uses_model_loss(loss: Any) -> bool:
    """``loss: null`` or ``"model"``: the model computes its own loss."""
    return loss is None or (isinstance(loss, str) and loss.lower() == "model")


class ModelOwnLoss:
    """The criterion of ``loss: null`` / ``"model"``: the model's own loss, ``outputs["loss"]`` or ``outputs.loss``
    (a Hugging Face model computes it when it receives the labels). Logged as ``loss``."""

    component_names = None

    def __init__(self) -> None:
        self.__name__ = "loss"

    def __call__(self, outputs: Any, target: Any = None) -> torch.Tensor:
        loss = outputs.get("loss") if isinstance(outputs, Mapping) else getattr(outputs, "loss", None)
        if loss is None:
            raise ValueError(f"training_params.loss: 'model' uses the model's own loss, but its output "
                             f"({type(outputs).__name__}) has no 'loss' (does the model receive the labels? a dict "
                             "batch passes them; a batch_adapter must put them in the inputs)")
        return loss

    def __repr__(self) -> str:
        return "ModelOwnLoss()"


def resolve_callable(value: Any, key: str, registry: Optional[Registry] = None) -> Optional[Callable[..., Any]]:
    """A callable from ``value``: itself, a registry name, a dotted import path (``pkg.module.function``), or a
    ``{_target_: ...}`` mapping (a function target alone is taken as is, a class is built with the other keys).
    ValueError naming ``training_params.<key>`` otherwise."""
    if value is None or callable(value):
        return value
    name, spec = parse_spec(value, key)
    if name == "_target_":
        target = str(spec["_target_"])
        found = _import_path(target, key)
        others = {k: v for k, v in spec.items() if k != "_target_" and not k.startswith("_")}
        built = found(**others) if inspect.isclass(found) or others else found
    elif name is not None and registry is not None and name in registry:
        found = registry.get(name)  # a class is built with the given params; a function is used as it is
        built = found(**spec) if inspect.isclass(found) else functools.partial(found, **spec) if spec else found
    elif name is not None and "." in name:
        built = _import_path(name, key)
    else:
        known = f" (registered: {', '.join(registry.names()) or 'none'})" if registry is not None else ""
        raise ValueError(f"training_params.{key}: {value!r} is not a callable, a registered name{known} or a "
                         "dotted import path like 'my_package.module.function'")
    if not callable(built):
        raise ValueError(f"training_params.{key}: {value!r} gave {type(built).__name__}, which is not callable")
    return built


def _import_path(path: str, key: str) -> Any:
    module_name, _, attribute = path.rpartition(".")
    try:
        return getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError, ValueError) as err:
        raise ValueError(f"training_params.{key}: cannot import {path!r}: {err}") from None


def build_batch_reader(params: Mapping[str, Any], device: torch.device) -> BatchReader:
    """The batch rules of a run: its ``batch_adapter``, and dict inputs that keep their labels when the model
    computes its own loss."""
    adapter = resolve_callable(params.get("batch_adapter"), "batch_adapter", BATCH_ADAPTERS)
    return BatchReader(device, adapter=adapter, keep_labels=uses_model_loss(params.get("loss")))


def resolve_train_step(params: Mapping[str, Any], net: nn.Module) -> Optional[Callable[[Any], Any]]:
    """``training_params.train_step``, else the model's own ``train_step(context)`` method, else None (forward +
    criterion). A model method with another signature (mmengine's ``train_step(data, optim_wrapper)``) is a
    ValueError: super_trainer would call it with the context."""
    step = resolve_callable(params.get("train_step"), "train_step")
    if step is not None:
        return step
    method = getattr(net, "train_step", None)
    if not callable(method):
        return None
    try:
        inspect.signature(method).bind(None)
    except TypeError:
        raise ValueError(f"{type(net).__name__}.train_step{inspect.signature(method)} is not train_step(context): "
                         "super_trainer calls a model's train_step with the context; rename it, or set "
                         "training_params.train_step to a function (context) -> loss") from None
    except ValueError:  # no signature (a builtin): trust it
        pass
    return method
