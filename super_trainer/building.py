"""Building a run: :func:`build_run` turns what ``train()`` was given (:class:`RunInputs`) into the parts the loop
runs with: the device, mixed precision, the built-in and user callbacks, the context, and the checks that need
the built objects. The trainer calls it before any event fires and before any file is written, so every
mistake surfaces as one ValueError naming the training_params key.

The optimizer is built in ``optimizers.py``, the criterion in ``losses.py``, the module wrappers in ``modules.py``,
the data-parallel wrapper (DDP, FSDP2 sharding, the user's own DDP) in ``parallel.py``.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import inspect
import logging
import warnings
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn

from . import distributed
from .batches import count_batches, optimizer_steps_per_epoch

from .callbacks.average_models import AverageBestModels
from .callbacks.base import Callback, CallbackHandler
from .callbacks.ema import EMAUpdate
from .callbacks.epoch_summary import EpochSummary
from .callbacks.grad_clip import GradientClipping
from .callbacks.logging import BaseLogger, TensorBoardLogger
from .callbacks.lr import (CosineLRSchedule, ExpLRSchedule, FunctionLRSchedule, LinearBatchLRWarmup,
                           LinearEpochLRWarmup, PolyLRSchedule, StepLRSchedule, TorchSchedulerCallback)
from .callbacks.mlflow_logger import MLflowLogger
from .callbacks.pre_prediction import PrePredictionCallback
from .callbacks.progress import ProgressBar
from .callbacks.yolo_warmup import YoloV5LRWarmup
from .context import PhaseContext
from .ema_sharded import make_ema
from .checks import check_loader, sample_target, warn_if_unbounded
from .losses import build_criterion, known_loss_names, resolve_metric_direction
from .loop.parts import Meters, RunParts
from .metrics import build_metrics, check_default_metrics, metric_titles
from .modules import convert_sync_bn, forward_module, move_to, unwrap_model
from .loop.optimizers import OptimizerSet
from .lr_modes import normalize_lr_mode, normalize_warmup_mode
from .named_optimizers import build_optimizers
from .optimizers import step_takes_closure
from .parallel import check_given_model, place_model, shard_if_requested
from .params import TrainingParams, resolve_training_params
from .params_yaml import write_params_yaml
from .sharding import check_same_batch_count, shard_loaders
from .params_runs import derive_max_epochs, run_horizon
from .registry import CALLBACKS, close_matches, parse_spec
from .rng import seed_everything
from .steps import build_batch_reader, resolve_train_step

__all__ = [
    "RunInputs", "build_run", "write_run_files", "join_process_group", "resolve_device", "check_metric_to_watch", "autocast_and_scaler",
    "builtin_callbacks", "build_lr_callbacks", "user_callbacks", "restart_callback_states",
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


def check_metric_to_watch(metric: str, criterion: Any, names: Optional[List[str]], titles: List[str],
                          callbacks: Sequence[Any] = ()) -> None:
    """ValueError unless ``metric`` is a metrics_dict key: a loss name, a metric title, or a name in a
    callback's ``metric_names`` (metrics it adds at on_validation_loader_end). Whether greater is better was
    settled before, where the loss names became known (:func:`~super_trainer.losses.resolve_metric_direction`,
    called by ``known_loss_names``)."""
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


def builtin_callbacks(params: TrainingParams, steps_per_epoch: Optional[int], ckpt_dir: Path,
                      several_optimizers: bool = False) -> List[Callback]:
    callbacks: List[Callback] = list(build_lr_callbacks(params, steps_per_epoch or 1))
    if params.get("pre_prediction_callback") is not None:
        callbacks.append(PrePredictionCallback(params.pre_prediction_callback))
    if params.ema:
        callbacks.append(EMAUpdate(total_steps=run_horizon(params, steps_per_epoch) or params.max_epochs,
                                   per_batch=several_optimizers))
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
    accepted = _init_parameters(logger_cls) - {"self", "log_dir"}
    taken = set().union(*(_init_parameters(other) for other in others)) - accepted
    given = {k: v for k, v in given.items() if k not in taken}
    used = {k: v for k, v in given.items() if k in accepted}
    ignored = {k: v for k, v in given.items() if k not in accepted}
    if ignored:
        lost = {k: v for k, v in ignored.items() if k not in _SG_LOGGER_OFF or v != _SG_LOGGER_OFF[k]}
        log = logger.warning if lost else logger.info
        log("sg_logger_params: ignoring %s (%s accepts %s)%s", sorted(ignored), logger_cls.__name__,
            sorted(accepted) or "none", f"; not supported: {lost}" if lost else "")
    return used


@functools.lru_cache(maxsize=None)
def _init_parameters(cls: type) -> frozenset:
    return frozenset(inspect.signature(cls.__init__).parameters)  # ~20 us each time: once per logger class


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
    horizon = run_horizon(params, steps_per_epoch) if params.get("max_steps") is not None else None
    common = dict(max_epochs=M, steps_per_epoch=steps_per_epoch, warmup_epochs=W, warmup_steps=S,
                  cooldown_epochs=C, total_steps=horizon)
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
    name, params = parse_spec(mode, "lr scheduler")
    scheduler_cls = getattr(torch.optim.lr_scheduler, str(name), None)
    if not (inspect.isclass(scheduler_cls) and name[0].isupper()):
        names = [n for n, v in vars(torch.optim.lr_scheduler).items() if inspect.isclass(v) and n.endswith(("LR", "Plateau"))]
        hint = close_matches(str(name), names)
        raise ValueError(f"training_params.lr_mode: unknown torch scheduler {name!r}"
                         + (f"; did you mean {' or '.join(map(repr, hint))}?" if hint else ""))
    params = dict(params)
    phase = params.pop("phase", None)
    metric_name = params.pop("metric_name", None)
    return TorchSchedulerCallback(scheduler_cls, params, phase=phase, metric_name=metric_name)



# ---- a whole run ----------------------------------------------------------------------------------------

@dataclasses.dataclass
class RunInputs:
    """What one ``train()`` call was given, directly or built from a recipe."""

    model: Any
    training_params: Any
    train_loader: Any
    valid_loader: Any = None
    test_loaders: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    context_extras: Dict[str, Any] = dataclasses.field(default_factory=dict)  # architecture, arch_params, ...
    first_writes: List[Callable[[Path], None]] = dataclasses.field(default_factory=list)  # once all is valid


def build_run(inputs: RunInputs, device: torch.device, ckpt_dir: Path, experiment_name: str) -> Tuple[RunParts, Meters]:
    """Everything the loop runs with, before any event fires and before any file is written: every mistake is a
    ValueError naming its training_params key."""
    if inputs.train_loader is None:
        raise ValueError("train_loader is required")
    if not isinstance(inputs.model, nn.Module):
        raise ValueError(f"model must be a torch.nn.Module or a recipe, got {type(inputs.model).__name__}")
    check_loader("train_loader", inputs.train_loader)
    if inputs.valid_loader is not None:
        check_loader("valid_loader", inputs.valid_loader)
    params = resolve_training_params(inputs.training_params)
    is_distributed, device = join_process_group(device)
    check_given_model(inputs.model, device, params.sync_bn, params.fsdp)  # FSDP1, a DDP that cannot be kept
    train_loader, valid_loader, test_loaders = shard_loaders(inputs.train_loader, inputs.valid_loader, dict(
        inputs.test_loaders or {}), params.seed, params.distributed_sampler)  # each rank its own share
    if params.seed is not None:
        seed_everything(params.seed)
    net = convert_sync_bn(move_to(unwrap_model(inputs.model), device), params, is_distributed, device)
    net = shard_if_requested(net, device, params, is_distributed)  # before the optimizer takes its parameters
    optimizers = OptimizerSet(build_optimizers(net, params))
    optimizer = optimizers.first.optimizer
    criterion = build_criterion(params, device)
    train_step = _train_step(params, net, optimizers)
    steps_per_epoch = _check_loaders(params, train_loader, inputs.valid_loader)  # the whole valid set: a rank's
    # share may be empty (fewer samples than ranks) without the validation being meaningless
    derive_max_epochs(params, steps_per_epoch)  # max_steps without max_epochs
    metrics = _build_metrics(params, bool(test_loaders))
    known = known_loss_names(criterion, params)
    resolve_metric_direction(params, criterion, known)  # before the callbacks: AverageBestModels reads it
    if valid_loader is not None:
        check_default_metrics(params, sample_target(inputs.valid_loader))
    autocast, scaler = autocast_and_scaler(params.mixed_precision, device)
    for handle in optimizers:
        _check_closure_optimizer(handle.optimizer, params, scaler, train_step)
    ema = make_ema(net, **params.ema_params) if params.ema else None  # per shard for FSDP2
    given_callbacks = user_callbacks(params)
    callbacks = CallbackHandler(builtin_callbacks(params, steps_per_epoch, ckpt_dir, optimizers.several)
                                + given_callbacks)
    restart_callback_states(given_callbacks)  # as first given; a resume then loads the checkpoint's state
    if valid_loader is not None:  # after the callbacks: their metric_names are valid keys too
        check_metric_to_watch(params.metric_to_watch, criterion, known, metric_titles(metrics["valid"]),
                              callbacks.callbacks)
    wrapped = place_model(inputs.model, net, device, params, is_distributed, train_step)  # DDP, FSDP2 or net
    model = forward_module(inputs.model, net, wrapped, params)  # torch_compile, or the user's compiled model
    context = PhaseContext(
        net=model, optimizer=optimizer, optimizers=optimizers.handles, criterion=criterion, device=device,
        ckpt_dir=ckpt_dir,
        experiment_name=experiment_name, sg_logger=_sg_logger(params, callbacks), train_loader=train_loader,
        valid_loader=valid_loader, training_params=params, metric_to_watch=params.metric_to_watch,
        train_metrics=metrics["train"], valid_metrics=metrics["valid"], test_metrics={}, ema_model=ema,
        lr_warmup_epochs=params.lr_warmup_epochs, global_step=0, epoch=0, max_epochs=params.max_epochs,
        steps_per_epoch=steps_per_epoch, total_steps=run_horizon(params, steps_per_epoch),
        batches_seen=0, rank=distributed.rank(), world_size=distributed.world_size(), history=[],
        loss_logging_items_names=known, ddp_silent_mode=not distributed.is_main_process(),
        **inputs.context_extras,
    )
    parts = RunParts(params=params, context=context, callbacks=callbacks, net=net, model=model, optimizer=optimizer,
                     scaler=scaler, autocast=autocast, ema=ema, test_loaders=test_loaders, distributed=is_distributed,
                     optimizers=optimizers, read_batch=build_batch_reader(params, device), train_step=train_step)
    return parts, Meters(context, params.get("loss_logging_items_names"), known, metrics, device)


def join_process_group(device: torch.device) -> Tuple[bool, torch.device]:
    """Under torchrun: join the process group; on CUDA each process takes its local rank's GPU."""
    is_distributed = distributed.init_from_env(device)
    if is_distributed and device.type == "cuda" and device.index is None:
        device = torch.device("cuda", distributed.local_rank())
        torch.cuda.set_device(device)
    return is_distributed, device


def _check_loaders(params: TrainingParams, train_loader: Any, valid_loader: Any) -> Optional[int]:
    """Loud failures for loaders without batches; returns the optimizer steps per epoch (None: unknown)."""
    train_batches = count_batches(train_loader, params.max_train_batches)
    warn_if_unbounded(train_batches, params)
    check_same_batch_count(train_batches)  # under torchrun: one clear error on every rank, before any collective
    if train_batches == 0:
        raise ValueError("train_loader has no batches (len(train_loader) == 0): nothing to train on; check the "
                         "dataset's size, batch_size and drop_last")
    if valid_loader is not None and count_batches(valid_loader, None) == 0:
        raise ValueError("valid_loader has no batches (len(valid_loader) == 0): validation metrics and "
                         "ckpt_best would be meaningless; pass valid_loader=None to train without validation")
    for key in ("val_check_interval", "save_top_k"):
        if params[key] is not None and valid_loader is None:
            raise ValueError(f"training_params.{key}: needs validation, but no valid_loader was given")
    steps = optimizer_steps_per_epoch(params, train_batches)
    if isinstance(params.val_check_interval, float) and steps is None:
        raise ValueError("training_params.val_check_interval: a fraction of an epoch needs the epoch's length, but "
                         "train_loader has no len(); set max_train_batches, or give an int (every N optimizer steps)")
    return steps


def _build_metrics(params: TrainingParams, testing: bool) -> Dict[str, Dict[str, Any]]:
    test_spec = params.test_metrics_list if params.test_metrics_list is not None else params.valid_metrics_list
    return {
        "train": build_metrics(params.train_metrics_list, "training_params.train_metrics_list"),
        "valid": build_metrics(params.valid_metrics_list, "training_params.valid_metrics_list"),
        "test": build_metrics(test_spec, "training_params.test_metrics_list") if testing else {},
    }


def _train_step(params: TrainingParams, net: nn.Module, optimizers: OptimizerSet) -> Optional[Callable[..., Any]]:
    """The run's train_step (None: forward + criterion); several optimizers need one."""
    train_step = resolve_train_step(params, net)
    if train_step is None and optimizers.several:
        raise ValueError(f"training_params.train_step: several optimizers ({', '.join(optimizers.handles)}) need a "
                         "train_step(context) that updates each through context.optimizers[name].update(loss)")
    return train_step


def _check_closure_optimizer(optimizer: torch.optim.Optimizer, params: TrainingParams, scaler: Any,
                             train_step: Any) -> None:
    if not step_takes_closure(optimizer):
        return
    if train_step is not None:
        raise ValueError(f"training_params.train_step: {type(optimizer).__name__}.step recomputes forward and loss "
                         "through a closure, which a custom train_step does not give; use another optimizer")
    if params.batch_accumulate > 1:
        raise ValueError(f"training_params.batch_accumulate: {type(optimizer).__name__}.step recomputes the loss "
                         "of the current batch through a closure, so it cannot accumulate; use batch_accumulate 1")
    if scaler is not None:
        raise ValueError(f"training_params.mixed_precision: {type(optimizer).__name__}.step needs a closure, "
                         "which fp16's GradScaler does not support; use 'bf16' or no mixed precision")


def _sg_logger(params: TrainingParams, callbacks: CallbackHandler) -> Any:
    """The logger other callbacks write to: the built-in one, or the logger object given as sg_logger."""
    found = next((cb for cb in callbacks.callbacks if isinstance(cb, BaseLogger)), None)
    if found is None and not isinstance(params.sg_logger, str):
        return params.sg_logger
    return found


def write_run_files(inputs: RunInputs, params: TrainingParams, ckpt_dir: Path) -> None:
    """The run dir's files that describe the run (rank 0): a recipe's own files, then the resolved params.
    Called once everything is validated and the checkpoint (if resuming) was read, so a failed start leaves an
    existing run dir as it was."""
    if not distributed.is_main_process():
        return
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    for write in inputs.first_writes:
        write(ckpt_dir)
    write_params_yaml(params, ckpt_dir / "training_params.yaml")
