"""Building a run from training_params: the device, mixed precision, the built-in and user callbacks, the
checks that need the built objects, and the params YAML. The trainer calls these before any event fires, so
every mistake surfaces as one ValueError naming the training_params key.

The optimizer is built in ``optimizers.py``, the criterion in ``losses.py``, and the module wrappers in
``modules.py``.
"""
from __future__ import annotations

import contextlib
import copy
import inspect
import logging
import warnings
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from omegaconf import OmegaConf
from torch.utils.data import DataLoader, Dataset, IterableDataset

from .callbacks.average_models import AverageBestModels
from .callbacks.base import Callback
from .callbacks.ema import EMAUpdate
from .callbacks.epoch_summary import EpochSummary
from .callbacks.grad_clip import GradientClipping
from .callbacks.logging import BaseLogger, TensorBoardLogger
from .callbacks.lr import (CosineLRSchedule, ExpLRSchedule, FunctionLRSchedule, LinearBatchLRWarmup,
                           LinearEpochLRWarmup, PolyLRSchedule, StepLRSchedule, TorchSchedulerCallback)
from .callbacks.pre_prediction import PrePredictionCallback
from .callbacks.progress import ProgressBar
from .batches import to_device
from .files import atomic_write_text
from .rng import preserved_rng
from .params import TrainingParams, normalize_lr_mode, normalize_warmup_mode
from .registry import CALLBACKS, close_matches, parse_spec

__all__ = [
    "resolve_device", "check_metric_to_watch", "autocast_and_scaler", "builtin_callbacks", "build_lr_callbacks",
    "user_callbacks", "write_params_yaml", "restart_callback_states", "check_experiment_name", "check_loader",
    "check_test_loaders", "warn_if_unbounded", "sample_target",
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


def check_experiment_name(name: Any) -> str:
    """The experiment name, or ValueError when it is not one folder name (``<ckpt_root_dir>/<name>`` must be a
    folder inside the root): empty, ".", or holding a path separator, ".." or a NUL. Called by Trainer.__init__."""
    if not isinstance(name, str):
        raise ValueError(f"experiment_name must be a string (one folder name), got {type(name).__name__}")
    bad = [c for c in ("/", "\\", "\0", "..") if c in name]
    if not name.strip() or name == "." or bad:
        why = f"holds {bad[0]!r}" if bad else "is empty" if not name.strip() else "is '.'"
        raise ValueError(f"experiment_name {name!r} {why}: it must be one folder name inside ckpt_root_dir "
                         "(letters, digits, '-', '_', '.'), e.g. 'resnet18_cifar10'")
    return name


def check_loader(key: str, loader: Any) -> None:
    """ValueError when ``loader`` (the value of ``key``: train_loader, valid_loader, test_loaders[name]) is a
    Dataset instead of a loader: iterating it would train on single unbatched samples."""
    if isinstance(loader, (Dataset, IterableDataset)) and not isinstance(loader, DataLoader):
        raise ValueError(f"{key}: got a {type(loader).__name__} (a Dataset), not a loader of batches; wrap it: "
                         f"DataLoader(dataset, batch_size=..., shuffle={key == 'train_loader'})")


def check_test_loaders(test_loaders: Any) -> Dict[str, Any]:
    """``test_loaders`` as a dict {name: loader} (None: {}); ValueError for a list, tuple or a single loader,
    naming the dict form (the names become the metrics' prefixes)."""
    if test_loaders is None:
        return {}
    if isinstance(test_loaders, Mapping):
        for name, loader in test_loaders.items():
            check_loader(f"test_loaders[{name!r}]", loader)
        return dict(test_loaders)
    kind = type(test_loaders).__name__
    example = "{'test': loader}" if not isinstance(test_loaders, (list, tuple)) else \
        "{" + ", ".join(f"'test_{i}': loader_{i}" for i in range(min(len(test_loaders), 2))) + "}"
    raise ValueError(f"test_loaders must be a dict {{name: loader}}, got a {kind}; give e.g. test_loaders={example} "
                     "(each name prefixes its metrics)")


def warn_if_unbounded(train_batches: Optional[int], params: Mapping[str, Any]) -> None:
    """Warn when the train loader has no len() and nothing bounds an epoch: if it never ends, no epoch ends, so
    validation and checkpoints never happen. ``train_batches`` is ``count_batches(train_loader, ...)``."""
    if train_batches is None and not params.get("max_train_batches") and not params.get("max_steps"):
        warnings.warn("train_loader has no len() and training_params.max_train_batches is not set: if the loader "
                      "never ends (a stream, itertools.cycle), the first epoch never ends and validation and "
                      "checkpoints never happen; set max_train_batches to the batches of one epoch", UserWarning,
                      stacklevel=2)


def sample_target(loader: Any) -> Any:
    """The target of one sample of ``loader``'s map-style dataset, collated as the loader would (a batch of
    one), without touching the loader's iterator, its sampler or the run's RNG; None when the loader has no
    indexable dataset or the sample cannot be read (the loop then checks its first batch instead)."""
    dataset = getattr(loader, "dataset", None)
    if isinstance(dataset, IterableDataset) or not hasattr(dataset, "__getitem__") or not hasattr(dataset, "__len__"):
        return None
    try:
        if len(dataset) == 0:
            return None
        with preserved_rng():  # a random augmentation in __getitem__ must not shift the run's numbers
            batch = loader.collate_fn([dataset[0]]) if callable(getattr(loader, "collate_fn", None)) else dataset[0]
        return to_device(batch, torch.device("cpu"))[1]
    except Exception:  # reading it fails the same way at the first batch, where the error belongs
        return None


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
    if params.sg_logger == "tensorboard":
        callbacks.append(TensorBoardLogger(log_dir=ckpt_dir, **_logger_params(TensorBoardLogger, params)))
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


def _logger_params(logger_cls: type, params: Mapping[str, Any]) -> Dict[str, Any]:
    """The ``sg_logger_params`` entries ``logger_cls`` accepts; the others are ignored with one log line."""
    given = dict(params.get("sg_logger_params") or {})
    accepted = set(inspect.signature(logger_cls.__init__).parameters) - {"self", "log_dir"}
    used = {k: v for k, v in given.items() if k in accepted}
    ignored = {k: v for k, v in given.items() if k not in accepted}
    if ignored:
        lost = {k: v for k, v in ignored.items() if k not in _SG_LOGGER_OFF or v != _SG_LOGGER_OFF[k]}
        log = logger.warning if lost else logger.info
        log("sg_logger_params: ignoring %s (%s accepts %s)%s", sorted(ignored), logger_cls.__name__,
            sorted(accepted) or "none", f"; not supported: {lost}" if lost else "")
    return used


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


def write_params_yaml(params: TrainingParams, path: Path) -> None:
    """The resolved training_params; objects that YAML cannot hold are written as their repr."""
    def plain(value: Any) -> Any:
        if isinstance(value, Mapping):
            return {str(k): plain(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        if value is None or isinstance(value, (bool, int, float, str)):
            return value
        return repr(value)

    atomic_write_text(path, OmegaConf.to_yaml(OmegaConf.create(plain(dict(params)))))


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

