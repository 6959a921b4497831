"""Building a run from training_params: device, optimizer and its param groups, criterion, mixed
precision, the built-in and user callbacks. The trainer calls these before any event fires, so every
mistake surfaces as one ValueError naming the training_params key."""
from __future__ import annotations

import contextlib
import copy
import inspect
import math
import random
import warnings
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn as nn

from .callbacks.average_models import AverageBestModels
from .callbacks.base import Callback
from .callbacks.ema import EMAUpdate
from .callbacks.grad_clip import GradientClipping
from .callbacks.logging import BaseLogger, TensorBoardLogger
from .callbacks.lr import build_lr_callbacks
from .callbacks.progress import ProgressBar
from .metrics import loss_names
from .params import TrainingParams
from . import sam as _sam  # noqa: F401  (registers the SAM optimizer)
from .registry import CALLBACKS, LOSSES, OPTIMIZERS, close_matches, parse_spec

__all__ = [
    "resolve_device", "seed_everything", "build_optimizer", "param_groups", "build_criterion", "known_loss_names",
    "check_metric_to_watch", "autocast_and_scaler", "builtin_callbacks", "user_callbacks", "optimizer_steps_per_epoch",
    "write_params_yaml", "restart_callback_states", "step_takes_closure",
]


def resolve_device(device: Union[str, torch.device, None]) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"device: {device!r} is not a device; use 'cpu', 'cuda' or 'cuda:N'") from err
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device: {device!r} requested but CUDA is not available; use 'cpu'")
    return resolved


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def build_optimizer(net: nn.Module, params: TrainingParams) -> torch.optim.Optimizer:
    if isinstance(params.optimizer, Mapping):  # {Name: {kwargs}}, e.g. {SAM: {base: SGD, rho: 0.05}}
        params = _optimizer_from_mapping(params)
    spec = params.optimizer
    if isinstance(spec, torch.optim.Optimizer):
        optimizer = spec
    else:
        factory = spec if isinstance(spec, type) else _registry_get(OPTIMIZERS, spec, "optimizer")
        groups = param_groups(net, params.initial_lr, params.zero_weight_decay_on_bias_and_bn,
                               params.optimizer_params.get("weight_decay", 0.0))
        default_lr = groups[-1]["lr"] if groups else 0.0
        try:
            optimizer = factory(groups, **{"lr": default_lr, **dict(params.optimizer_params)})
        except TypeError as err:
            raise ValueError(f"training_params.optimizer_params: {err}") from None
    for group in optimizer.param_groups:
        group["initial_lr"] = group["lr"]  # lr0 of every schedule
    return optimizer


def _optimizer_from_mapping(params: TrainingParams) -> TrainingParams:
    """``optimizer: {Name: {kwargs}}`` as ``optimizer: Name`` with the kwargs under optimizer_params
    (optimizer_params wins on a key given in both)."""
    name, kwargs = parse_spec(params.optimizer, "optimizer")
    if name == "_target_":
        raise ValueError("training_params.optimizer: give {Name: {params}}, not a _target_ (the trainer passes "
                         "the param groups itself)")
    return TrainingParams(params, optimizer=name, optimizer_params={**kwargs, **dict(params.optimizer_params)})


def _registry_get(registry: Any, name: str, key: str) -> Any:
    try:
        return registry.get(name)
    except ValueError as err:
        raise ValueError(f"training_params.{key}: {err}") from None


def param_groups(net: nn.Module, initial_lr: Any, split_no_decay: bool, weight_decay: float) -> List[Dict[str, Any]]:
    """Param groups for ``initial_lr`` (a number, or {prefix: lr, "default": lr} matched by longest prefix)."""
    lrs = dict(initial_lr) if isinstance(initial_lr, Mapping) else {"default": float(initial_lr)}
    prefixes = sorted((p for p in lrs if p != "default"), key=len, reverse=True)
    members: Dict[str, List[Tuple[str, nn.Parameter]]] = {name: [] for name in lrs}
    unmatched = []
    for pname, param in net.named_parameters():
        prefix = next((p for p in prefixes if pname.startswith(p)), None)
        if prefix is None and "default" not in lrs:
            unmatched.append(pname)
            continue
        members[prefix or "default"].append((pname, param))
    if unmatched:
        raise ValueError(f"training_params.initial_lr: parameters {unmatched[:3]} match no prefix; add a 'default' lr")
    for prefix in prefixes:
        if not members[prefix]:
            names = [n for n, _ in net.named_parameters()][:5]
            raise ValueError(f"training_params.initial_lr: prefix {prefix!r} matches no parameter (names look like {names})")
    no_decay = no_decay_names(net) if split_no_decay else set()
    ordered = [p for p in lrs if p != "default"] + (["default"] if "default" in lrs else [])
    groups: List[Dict[str, Any]] = []
    for name in ordered:
        lr = float(lrs[name])
        if lr == 0.0:  # lr 0 freezes: no gradients are computed for these parameters
            for _, param in members[name]:
                param.requires_grad_(False)
        decay = [p for n, p in members[name] if n not in no_decay]
        plain = [p for n, p in members[name] if n in no_decay]
        if decay or not plain:
            groups.append({"params": decay, "lr": lr, "name": name})
        if plain:
            groups.append({"params": plain, "lr": lr, "name": f"{name}_no_decay", "weight_decay": 0.0})
    return [g for g in groups if g["params"]] or groups[:1]


def no_decay_names(net: nn.Module) -> set:
    """Biases and the weights of normalization layers: weight decay only shrinks them needlessly."""
    norm_types = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, nn.LocalResponseNorm)
    names = set()
    for mname, module in net.named_modules():
        for pname, _ in module.named_parameters(recurse=False):
            full = f"{mname}.{pname}" if mname else pname
            if pname == "bias" or isinstance(module, norm_types):
                names.add(full)
    return names


def build_criterion(params: Mapping[str, Any], device: torch.device) -> Callable[..., Any]:
    spec = params["loss"]
    name, _ = parse_spec(spec, "loss")
    if name is None:
        if not callable(spec):
            raise ValueError(f"training_params.loss: {spec!r} is not a loss; give a name like 'CrossEntropyLoss', "
                             "{Name: {params}}, an nn.Module or a callable")
        criterion = spec
    else:
        try:
            criterion = LOSSES.build(spec, **dict(params.get("criterion_params") or {}))
        except ValueError as err:
            raise ValueError(f"training_params.loss: {err}") from None
        except TypeError as err:
            raise ValueError(f"training_params.criterion_params: {err}") from None
    if isinstance(criterion, nn.Module):
        criterion = criterion.to(device)
    return criterion


def known_loss_names(criterion: Any, params: Mapping[str, Any]) -> Optional[List[str]]:
    """Loss names known before the first batch; None when they depend on what the loss returns."""
    declared = params.get("loss_logging_items_names") or getattr(criterion, "component_names", None)
    if declared:
        return loss_names(criterion, list(declared))
    return None


def check_metric_to_watch(metric: str, criterion: Any, names: Optional[List[str]], titles: List[str],
                          callbacks: Sequence[Any] = ()) -> None:
    """ValueError unless ``metric`` is a metrics_dict key: a loss name, a metric title, or a name in a
    callback's ``metric_names`` (metrics it adds at on_validation_loader_end)."""
    base = getattr(criterion, "__name__", None) or type(criterion).__name__
    declared = [str(n) for cb in callbacks for n in (getattr(cb, "metric_names", ()) or ())]
    keys = list(names or [base]) + titles + declared
    lowered = metric.lower()
    if any(k.lower() == lowered for k in keys):
        return
    if names is None and lowered.startswith(base.lower() + "/"):
        return  # a component of a loss whose component names appear with its first output
    hint = close_matches(metric, keys, n=1)
    raise ValueError(f"training_params.metric_to_watch: {metric!r} is not a metrics_dict key; valid keys: {keys}"
                     + (f" (did you mean {hint[0]!r}?)" if hint else ""))


def autocast_and_scaler(setting: Union[bool, str], device: torch.device) -> Tuple[Any, Optional[torch.amp.GradScaler]]:
    """(autocast context manager, GradScaler or None): bf16 on CPU, fp16 + GradScaler on CUDA for True.

    Both context managers can be entered again and again, so no object is built per batch."""
    if not setting:
        return contextlib.nullcontext(), None
    if setting in ("bf16", "bfloat16"):
        dtype = torch.bfloat16
    elif setting in ("fp16", "float16"):
        dtype = torch.float16
    else:
        dtype = torch.float16 if device.type == "cuda" else torch.bfloat16
    scaler = torch.amp.GradScaler(device.type) if dtype == torch.float16 and device.type == "cuda" else None
    return torch.autocast(device_type=device.type, dtype=dtype), scaler


def builtin_callbacks(params: TrainingParams, steps_per_epoch: Optional[int], ckpt_dir: Path) -> List[Callback]:
    callbacks: List[Callback] = list(build_lr_callbacks(params, steps_per_epoch or 1))
    if params.ema:
        callbacks.append(EMAUpdate(total_steps=(steps_per_epoch or 1) * params.max_epochs))
    if params.clip_grad_norm:
        callbacks.append(GradientClipping(params.clip_grad_norm))
    if params.average_best_models:
        callbacks.append(AverageBestModels(params.metric_to_watch, params.greater_metric_to_watch_is_better))
    if params.sg_logger == "tensorboard":
        callbacks.append(TensorBoardLogger(log_dir=ckpt_dir))
    elif params.sg_logger == "base":
        callbacks.append(BaseLogger(log_dir=ckpt_dir))
    elif isinstance(params.sg_logger, Callback):
        callbacks.append(params.sg_logger)
    if params.progress_bar and not params.silent_mode:
        callbacks.append(ProgressBar())
    return callbacks


def user_callbacks(params: TrainingParams) -> List[Callback]:
    callbacks = []
    for spec in params.phase_callbacks:
        if isinstance(spec, Callback):
            callbacks.append(spec)
            continue
        try:
            built = CALLBACKS.build(spec)
        except ValueError as err:
            raise ValueError(f"training_params.phase_callbacks: {err}") from None
        except TypeError as err:  # missing or unexpected constructor arguments
            raise ValueError(f"training_params.phase_callbacks: cannot build {spec!r}: {err}") from None
        if not isinstance(built, Callback):
            raise ValueError(f"training_params.phase_callbacks: {spec!r} is not a Callback")
        callbacks.append(built)
    return callbacks


def optimizer_steps_per_epoch(params: TrainingParams, train_batches: Optional[int]) -> Optional[int]:
    """Optimizer steps per epoch (L), from len(train_loader) or max_train_batches; ValueError when a
    schedule needs L and neither gives it."""
    batches = train_batches if train_batches is not None else params.max_train_batches
    if batches is not None:
        return max(1, math.ceil(batches / params.batch_accumulate))
    needs = []
    if params.lr_mode in ("cosine", "poly", "exp", "function"):
        needs.append(f"lr_mode {params.lr_mode!r}")
    if params.lr_warmup_epochs and params.warmup_mode == "linear_batch_step" and not params.lr_warmup_steps:
        needs.append("linear_batch_step warmup over lr_warmup_epochs")
    if params.ema and params.ema_params["decay_type"] == "exp":
        needs.append("ema decay_type 'exp'")
    if needs:
        raise ValueError(f"training_params.max_train_batches: {' and '.join(needs)} need the number of batches "
                         "per epoch, but train_loader has no len(); set max_train_batches")
    return None


def write_params_yaml(params: TrainingParams, path: Path) -> None:
    """The resolved training_params; objects that YAML cannot hold are written as their repr."""
    from omegaconf import OmegaConf

    def plain(value: Any) -> Any:
        if isinstance(value, Mapping):
            return {str(k): plain(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        if value is None or isinstance(value, (bool, int, float, str)):
            return value
        return repr(value)

    tmp = path.with_suffix(".yaml.tmp")
    OmegaConf.save(OmegaConf.create(plain(dict(params))), tmp)
    tmp.replace(path)


def restart_callback_states(callbacks: List[Callback]) -> None:
    """Give each stateful user callback the state it had when first given to a Trainer, so a second
    ``train()`` with the same objects (a re-run notebook cell) behaves like the first. A resume then loads
    the checkpoint's state over it."""
    for callback in callbacks:
        if not (callable(getattr(callback, "state_dict", None)) and callable(getattr(callback, "load_state_dict", None))):
            continue
        initial = getattr(callback, "_initial_state_for_super_trainer", None)
        if initial is None:
            try:
                callback._initial_state_for_super_trainer = copy.deepcopy(callback.state_dict())
            except AttributeError:  # __slots__: the object cannot remember; it keeps its state
                warnings.warn(f"{type(callback).__name__}: cannot remember its initial state (no __dict__); a second "
                              "train() starts from the state the first left", stacklevel=4)
            continue
        try:
            callback.load_state_dict(copy.deepcopy(initial))
        except Exception as err:
            raise ValueError(f"callback {getattr(callback, 'state_key', type(callback).__name__)!r}: cannot restore "
                             f"its initial state for a new run: load_state_dict failed ({err})") from err


def step_takes_closure(optimizer: torch.optim.Optimizer) -> bool:
    """True for optimizers whose step() uses a closure beyond evaluating it first (LBFGS, SAM, third-party
    optimizers with a ``closure`` parameter). torch's other optimizers only evaluate it before changing the
    weights, so they step without one and pay nothing."""
    if isinstance(optimizer, torch.optim.LBFGS):
        return True
    if type(optimizer).__module__.startswith("torch.optim"):
        return False
    try:
        return "closure" in inspect.signature(optimizer.step).parameters
    except (TypeError, ValueError):
        return False
