"""Building a run from training_params: device, optimizer and its param groups, criterion, mixed
precision, the built-in and user callbacks. The trainer calls these before any event fires, so every
mistake surfaces as one ValueError naming the training_params key."""
from __future__ import annotations

import contextlib
import copy
import inspect
import logging
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
from .callbacks.epoch_summary import EpochSummary
from .callbacks.grad_clip import GradientClipping
from .callbacks.logging import BaseLogger, TensorBoardLogger
from .callbacks.mlflow_logger import MLflowLogger
from .callbacks.lr import build_lr_callbacks
from .callbacks.progress import ProgressBar
from .checkpoint import unwrap_model
from .metrics import loss_names
from .optimizers import sg_optimizer_defaults
from .params import TrainingParams
from . import sam as _sam  # noqa: F401  (registers the SAM optimizer)
from .registry import CALLBACKS, LOSSES, OPTIMIZERS, close_matches, parse_spec

__all__ = [
    "resolve_device", "seed_everything", "build_optimizer", "param_groups", "build_criterion", "known_loss_names",
    "check_metric_to_watch", "autocast_and_scaler", "builtin_callbacks", "user_callbacks", "optimizer_steps_per_epoch",
    "write_params_yaml", "restart_callback_states", "step_takes_closure", "convert_sync_bn", "forward_module",
    "is_compiled", "PrePredictionCallback", "model_param_groups",
]

logger = logging.getLogger("super_trainer")


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
        _optimizer_from_mapping(params)
    spec = params.optimizer
    if isinstance(spec, torch.optim.Optimizer):
        optimizer = spec
    else:
        factory = spec if isinstance(spec, type) else _registry_get(OPTIMIZERS, spec, "optimizer")
        # SG 3.7's per-optimizer defaults (SGD: momentum 0.9, weight_decay 1e-4, ...) under the given values;
        # written back so training_params.yaml shows what the optimizer really got
        params["optimizer_params"] = {**sg_optimizer_defaults(factory), **dict(params.optimizer_params)}
        if callable(getattr(net, "initialize_param_groups", None)):
            groups = model_param_groups(net, params)
            default_lr = float(params.initial_lr)
        else:
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


def _optimizer_from_mapping(params: TrainingParams) -> None:
    """Rewrite ``optimizer: {Name: {kwargs}}`` as ``optimizer: Name`` with the kwargs under optimizer_params
    (optimizer_params wins on a key given in both), so training_params.yaml shows what was built."""
    name, kwargs = parse_spec(params.optimizer, "optimizer")
    if name == "_target_":
        raise ValueError("training_params.optimizer: give {Name: {params}}, not a _target_ (the trainer passes "
                         "the param groups itself)")
    params["optimizer"], params["optimizer_params"] = name, {**kwargs, **dict(params.optimizer_params)}


def model_param_groups(net: nn.Module, params: TrainingParams) -> List[Dict[str, Any]]:
    """Param groups from the model's SuperGradients-style ``initialize_param_groups(lr, training_params)``: a
    list of dicts with ``named_params`` (or ``params``) and per-group optimizer options. With
    zero_weight_decay_on_bias_and_bn each group is split into a no-decay and a decay group, as SG does."""
    lr = params.initial_lr
    if isinstance(lr, Mapping):
        raise ValueError("training_params.initial_lr: the model defines initialize_param_groups(lr, training_params), "
                         "which takes one lr; give initial_lr as a number")
    given = net.initialize_param_groups(float(lr), params)
    if not isinstance(given, (list, tuple)) or not all(isinstance(g, Mapping) for g in given):
        raise ValueError(f"{type(net).__name__}.initialize_param_groups must return a list of dicts with "
                         f"'named_params' and optimizer options, got {type(given).__name__}")
    no_decay = no_decay_names(net) if params.zero_weight_decay_on_bias_and_bn else set()
    names = {id(p): n for n, p in net.named_parameters()}
    weight_decay = params.optimizer_params.get("weight_decay", 0.0)
    groups: List[Dict[str, Any]] = []
    for group in given:
        options = {k: v for k, v in group.items() if k not in ("named_params", "params")}
        if "named_params" in group:
            members = list(group["named_params"])
        else:
            members = [(names.get(id(p), ""), p) for p in group.get("params", [])]
        if not params.zero_weight_decay_on_bias_and_bn:
            groups.append({**options, "params": [p for _, p in members]})
            continue
        options.pop("weight_decay", None)
        groups.append({**options, "params": [p for n, p in members if n in no_decay], "weight_decay": 0.0})
        groups.append({**options, "params": [p for n, p in members if n not in no_decay], "weight_decay": weight_decay})
    return [g for g in groups if g["params"]]


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
    spec = _sg_loss_name(params["loss"])
    name, _ = parse_spec(spec, "loss")
    if name is None:
        if not callable(spec):
            raise ValueError(f"training_params.loss: {spec!r} is not a loss; give a name like 'CrossEntropyLoss', "
                             "{Name: {params}}, an nn.Module or a callable")
        criterion = spec
    else:
        try:
            criterion = LOSSES.build(spec, **_sg_criterion_params(spec, dict(params.get("criterion_params") or {})))
        except ValueError as err:
            raise ValueError(f"training_params.loss: {err}") from None
        except TypeError as err:
            raise ValueError(f"training_params.criterion_params: {err}") from None
    if isinstance(criterion, nn.Module):
        criterion = criterion.to(device)
    if params.get("torch_compile_loss"):
        logger.info("torch_compile_loss: compiling the loss with %s", params.get("torch_compile_options") or {})
        criterion = torch.compile(criterion, **_compile_kwargs(params))
    return criterion


#: SuperGradients' loss names (and its deprecated lower-case ones) for the torch losses they are.
SG_LOSS_NAMES = {"cross_entropy": "CrossEntropyLoss", "MSE": "MSELoss", "mse": "MSELoss"}


def _sg_loss_name(spec: Any) -> Any:
    """``spec`` with a SuperGradients loss name replaced by the torch one (unless the user registered that name)."""
    name, params = parse_spec(spec, "loss")
    if name not in SG_LOSS_NAMES or name in LOSSES:
        return spec
    return SG_LOSS_NAMES[name] if isinstance(spec, str) else {SG_LOSS_NAMES[name]: params}

#: SuperGradients' CrossEntropyLoss arguments that torch's lacks, with their "off" values.
_SG_CE_OFF = {"smooth_dist": None, "from_logits": True}


def _sg_criterion_params(spec: Any, given: Dict[str, Any]) -> Dict[str, Any]:
    """SG's ``smooth_eps`` (label smoothing) for a CrossEntropyLoss: torch's ``label_smoothing``, which computes
    the same loss, −((1−ε)·log p_y + ε·mean_c log p_c), for class-index targets."""
    name, spec_params = parse_spec(spec, "loss")
    if name is None or name == "_target_":
        return given
    try:
        factory = LOSSES.get(name)
    except ValueError:
        return given  # LOSSES.build names the unknown loss
    if not (isinstance(factory, type) and issubclass(factory, nn.CrossEntropyLoss)):
        return given
    merged = {**given, **spec_params}
    params = dict(given)
    if "smooth_eps" in merged:
        eps = merged["smooth_eps"]
        params.pop("smooth_eps", None)
        if eps is not None:
            if "label_smoothing" in merged:
                raise ValueError("training_params.criterion_params: give smooth_eps or label_smoothing, not both")
            params["label_smoothing"] = float(eps)
    for key, off in _SG_CE_OFF.items():
        if key in merged:
            if merged[key] != off:
                raise ValueError(f"training_params.criterion_params: SuperGradients' {key}={merged[key]!r} is not "
                                 f"supported (only {off!r}); use label_smoothing / smooth_eps")
            params.pop(key, None)
    return params


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
    if params.get("pre_prediction_callback") is not None:
        callbacks.append(PrePredictionCallback(params.pre_prediction_callback))
    if params.ema:
        callbacks.append(EMAUpdate(total_steps=(steps_per_epoch or 1) * params.max_epochs))
    if params.clip_grad_norm:
        callbacks.append(GradientClipping(params.clip_grad_norm))
    if params.average_best_models and params.get("save_model", True):  # save_model False: no checkpoint files
        callbacks.append(AverageBestModels(params.metric_to_watch, params.greater_metric_to_watch_is_better))
    if params.sg_logger in ("tensorboard", "mlflow"):  # mlflow: TensorBoard and experiment.log as well
        with_mlflow = (MLflowLogger,) if params.sg_logger == "mlflow" else ()
        callbacks.append(TensorBoardLogger(log_dir=ckpt_dir, **_logger_params(TensorBoardLogger, params, with_mlflow)))
        if with_mlflow:
            callbacks.append(MLflowLogger(**_logger_params(MLflowLogger, params, (TensorBoardLogger,))))
    elif params.sg_logger == "base":
        callbacks.append(BaseLogger(log_dir=ckpt_dir, **_logger_params(BaseLogger, params)))
    elif isinstance(params.sg_logger, Callback):
        callbacks.append(params.sg_logger)
    if not isinstance(params.sg_logger, str) and params.get("sg_logger_params"):
        logger.info("sg_logger_params: ignoring %s: sg_logger is an object, already built",
                    sorted(params.sg_logger_params))
    if params.progress_bar and not params.silent_mode:
        callbacks.append(ProgressBar())
    if not params.silent_mode:
        callbacks.append(EpochSummary())
    return callbacks


#: sg_logger_params entries of SG's base_sg_logger and their "off" values: ignored with an INFO line when off,
#: with a WARNING when set to a feature super_trainer's loggers lack.
_SG_LOGGER_OFF = {"tb_files_user_prompt": False, "launch_tensorboard": False, "tensorboard_port": None,
                  "save_checkpoints_remote": False, "save_tensorboard_remote": False, "save_logs_remote": False,
                  "monitor_system": True, "project_name": "", "model_name": None}


def _logger_params(logger_cls: type, params: Mapping[str, Any], others: Tuple[type, ...] = ()) -> Dict[str, Any]:
    """The ``sg_logger_params`` entries ``logger_cls`` accepts; the others (except those of the ``others`` built
    beside it) are ignored with one log line."""
    given = dict(params.get("sg_logger_params") or {})
    accepted = set(inspect.signature(logger_cls.__init__).parameters) - {"self", "log_dir"}
    taken = set().union(*(inspect.signature(other.__init__).parameters for other in others)) - accepted
    given = {k: v for k, v in given.items() if k not in taken}
    used = {k: v for k, v in given.items() if k in accepted}
    ignored = {k: v for k, v in given.items() if k not in accepted}
    if ignored:
        lost = {k: v for k, v in ignored.items() if k not in _SG_LOGGER_OFF or v != _SG_LOGGER_OFF[k]}
        log = logger.warning if lost else logger.info
        log("sg_logger_params: ignoring %s (%s accepts %s)%s", sorted(ignored), logger_cls.__name__,
            sorted(accepted) or "none", f"; not supported: {lost}" if lost else "")
    return used


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


def convert_sync_bn(net: nn.Module, params: Mapping[str, Any], is_distributed: bool, device: torch.device) -> nn.Module:
    """``sync_bn``: BatchNorm layers become SyncBatchNorm under DDP (batch statistics over all ranks); on one
    process a no-op with a log line. Returns the module to train (the same one unless it is itself a BatchNorm)."""
    if not params.get("sync_bn"):
        return net
    if not is_distributed:
        logger.info("sync_bn: a single process, so BatchNorm layers stay as they are")
        return net
    if device.type != "cuda":
        raise ValueError("training_params.sync_bn: SyncBatchNorm needs CUDA devices; set sync_bn false on CPU")
    logger.info("sync_bn: converting BatchNorm layers to SyncBatchNorm")
    return nn.SyncBatchNorm.convert_sync_batchnorm(net)


def _compile_kwargs(params: Mapping[str, Any]) -> Dict[str, Any]:
    kwargs = dict(params.get("torch_compile_options") or {})
    if params.get("torch_compile_mode") is not None:
        kwargs["mode"] = params["torch_compile_mode"]
    return kwargs


def is_compiled(model: Any) -> bool:
    """True for what torch.compile(module) returns."""
    return isinstance(getattr(model, "_orig_mod", None), nn.Module)


def forward_module(given: nn.Module, net: nn.Module, wrapped: nn.Module, params: Mapping[str, Any]) -> nn.Module:
    """What the training forward calls: ``torch_compile`` compiles ``wrapped`` (net or DDP(net)); a model the user
    passed already compiled stays compiled. Checkpoints keep saving ``net``'s plain state_dict."""
    if params.get("torch_compile"):
        logger.info("torch_compile: compiling the model with %s (the first batches are slow)", _compile_kwargs(params))
        return torch.compile(wrapped, **_compile_kwargs(params))
    if is_compiled(given) and unwrap_model(given) is net:
        if wrapped is net:
            return given  # the user's own compiled wrapper, options and all
        logger.info("the model was given compiled: compiling its DistributedDataParallel wrapper instead")
        return torch.compile(wrapped)
    return wrapped


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
