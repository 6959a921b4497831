"""``training_params``: defaults and validation (SPEC §2).

Every mistake raises ``ValueError`` before the first batch, naming the key and what would be valid.
"""
from __future__ import annotations

import copy
from collections.abc import Mapping as MappingABC
from typing import Any, Dict, Mapping

import torch

from .callbacks.lr import normalize_lr_mode, normalize_warmup_mode
from .registry import close_matches, to_plain

__all__ = ["DEFAULT_TRAINING_PARAMS", "REQUIRED", "TrainingParams", "resolve_training_params"]


class _Required:
    """Marks a key without a default; one instance, kept through copies."""

    def __repr__(self) -> str:
        return "<required>"

    def __deepcopy__(self, memo: Dict[int, Any]) -> "_Required":
        return self


REQUIRED: Any = _Required()

EMA_DEFAULTS: Dict[str, Any] = {"decay": 0.9999, "decay_type": "exp", "beta": 15.0, "start_step": 0, "interval": 1}

DEFAULT_TRAINING_PARAMS: Dict[str, Any] = {
    "max_epochs": REQUIRED,
    "initial_lr": None,
    "optimizer": "SGD",
    "optimizer_params": {},
    "zero_weight_decay_on_bias_and_bn": False,
    "loss": "CrossEntropyLoss",
    "criterion_params": {},
    "loss_logging_items_names": None,
    "train_metrics_list": [],
    "valid_metrics_list": ["Accuracy"],
    "test_metrics_list": None,
    "metric_to_watch": "Accuracy",
    "greater_metric_to_watch_is_better": True,
    "lr_mode": None,
    "lr_warmup_epochs": 0,
    "lr_warmup_steps": 0,
    "lr_cooldown_epochs": 0,
    "warmup_initial_lr": None,
    "warmup_mode": None,
    "lr_updates": [],
    "lr_decay_factor": 0.1,
    "cosine_final_lr_ratio": 0.01,
    "lr_schedule_function": None,
    "batch_accumulate": 1,
    "clip_grad_norm": None,
    "mixed_precision": False,
    "ema": False,
    "ema_params": dict(EMA_DEFAULTS),
    "log_interval": 50,
    "phase_callbacks": [],
    "run_validation_freq": 1,
    "run_test_freq": None,
    "max_train_batches": None,
    "max_valid_batches": None,
    "save_ckpt_epoch_list": [],
    "save_ckpt_every_n_steps": None,
    "max_keep_ckpts": None,
    "average_best_models": False,
    "resume": False,
    "resume_path": None,
    "resume_weights_only": True,
    "seed": 42,
    "sg_logger": "tensorboard",
    "silent_mode": False,
    "progress_bar": True,
    "stop_on_non_finite_loss": True,
}

MIXED_PRECISION_VALUES = (False, True, "bf16", "bfloat16", "fp16", "float16")
SG_LOGGERS = ("tensorboard", "base")


class TrainingParams(dict):
    """The resolved training_params: a dict that also allows attribute access (``params.max_epochs``)."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


def _error(key: str, message: str) -> ValueError:
    return ValueError(f"training_params.{key}: {message}")


def _int(params: Mapping[str, Any], key: str, minimum: int, optional: bool = False) -> None:
    value = params[key]
    if optional and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        allowed = f"an int >= {minimum}" + (" or None" if optional else "")
        raise _error(key, f"must be {allowed}, got {value!r}")


def _number(params: Mapping[str, Any], key: str, positive: bool = True, optional: bool = False) -> None:
    value = params[key]
    if optional and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (positive and value <= 0):
        allowed = ("a number > 0" if positive else "a number") + (" or None" if optional else "")
        raise _error(key, f"must be {allowed}, got {value!r}")


def resolve_training_params(given: Any) -> TrainingParams:
    """Merge ``given`` (dict or DictConfig) over the defaults and validate; ValueError names the bad key."""
    if given is None:
        raise ValueError("training_params is required (at least {'max_epochs': N, 'initial_lr': lr})")
    given = to_plain(given)
    if not isinstance(given, MappingABC):
        raise ValueError(f"training_params must be a dict or DictConfig, got {type(given).__name__}")
    for key in given:
        if key not in DEFAULT_TRAINING_PARAMS:
            hint = close_matches(str(key), DEFAULT_TRAINING_PARAMS, n=1)
            suggestion = f"; did you mean {hint[0]!r}?" if hint else ""
            raise ValueError(f"training_params: unknown key {key!r}{suggestion}")
    params = TrainingParams(copy.deepcopy(DEFAULT_TRAINING_PARAMS))  # no run shares a mutable default
    params.update(given)
    for key, value in params.items():
        if value is REQUIRED:
            raise _error(key, "is required")
    _validate(params)
    return params


def _validate(params: TrainingParams) -> None:
    _int(params, "max_epochs", 1)
    optimizer = params["optimizer"]
    is_instance = isinstance(optimizer, torch.optim.Optimizer)
    initial_lr = params["initial_lr"]
    if is_instance:
        if initial_lr is not None:
            raise _error("initial_lr", "must not be given with an Optimizer instance (its param groups' lr are used)")
        for key in ("optimizer_params", "zero_weight_decay_on_bias_and_bn"):
            if params[key]:
                raise _error(key, "does not apply to an Optimizer instance; configure the instance itself, "
                                  "or give optimizer as a name")
    elif initial_lr is None:
        raise _error("initial_lr", "is required (a number, or {param-name prefix: lr, 'default': lr})")
    elif isinstance(initial_lr, MappingABC):
        for prefix, lr in initial_lr.items():
            if isinstance(lr, bool) or not isinstance(lr, (int, float)) or lr < 0:
                raise _error("initial_lr", f"the lr for {prefix!r} must be a number >= 0, got {lr!r}")
    else:
        _number(params, "initial_lr")
    if not (is_instance or isinstance(optimizer, str) or (isinstance(optimizer, MappingABC) and len(optimizer) == 1)
            or (isinstance(optimizer, type) and issubclass(optimizer, torch.optim.Optimizer))):
        raise _error("optimizer", f"must be a torch.optim name ('SGD', 'AdamW', ...), class or instance, got {optimizer!r}")
    for key in ("optimizer_params", "criterion_params", "ema_params"):
        if params[key] is None:
            params[key] = {}
        if not isinstance(params[key], MappingABC):
            raise _error(key, f"must be a mapping, got {params[key]!r}")
    unknown_ema = set(params["ema_params"]) - set(EMA_DEFAULTS)
    if unknown_ema:
        key = sorted(unknown_ema)[0]
        hint = close_matches(key, EMA_DEFAULTS, n=1)
        raise _error("ema_params", f"unknown key {key!r}" + (f"; did you mean {hint[0]!r}?" if hint else "")
                     + f" (valid: {list(EMA_DEFAULTS)})")
    params["ema_params"] = {**EMA_DEFAULTS, **params["ema_params"]}
    _int(params, "batch_accumulate", 1)
    _int(params, "log_interval", 1)
    _int(params, "run_validation_freq", 1)
    _int(params, "run_test_freq", 1, optional=True)
    _int(params, "max_train_batches", 1, optional=True)
    _int(params, "max_valid_batches", 1, optional=True)
    _int(params, "save_ckpt_every_n_steps", 1, optional=True)
    _int(params, "max_keep_ckpts", 1, optional=True)
    _int(params, "lr_warmup_epochs", 0)
    _int(params, "lr_warmup_steps", 0)
    _int(params, "lr_cooldown_epochs", 0)
    _int(params, "seed", 0, optional=True)
    _number(params, "clip_grad_norm", optional=True)
    _number(params, "warmup_initial_lr", positive=False, optional=True)
    _number(params, "lr_decay_factor", positive=False)
    _number(params, "cosine_final_lr_ratio", positive=False)
    if params["mixed_precision"] not in MIXED_PRECISION_VALUES:
        raise _error("mixed_precision", f"must be one of {list(MIXED_PRECISION_VALUES)}, got {params['mixed_precision']!r}")
    sg_logger = params["sg_logger"]
    if not (sg_logger in SG_LOGGERS or hasattr(sg_logger, "add_scalar")):
        raise _error("sg_logger", f"must be one of {list(SG_LOGGERS)} or a logger object, got {sg_logger!r}")
    epochs = params["save_ckpt_epoch_list"] or []
    if not all(isinstance(e, int) and not isinstance(e, bool) and e >= 1 for e in epochs):
        raise _error("save_ckpt_epoch_list", f"must be a list of epoch counts >= 1, got {epochs!r}")
    params["save_ckpt_epoch_list"] = list(epochs)
    updates = params["lr_updates"] or []
    if not all(isinstance(u, int) and not isinstance(u, bool) for u in updates):
        raise _error("lr_updates", f"must be a list of epochs (ints), got {updates!r}")
    params["lr_mode"] = normalize_lr_mode(params["lr_mode"])
    params["warmup_mode"] = normalize_warmup_mode(params["warmup_mode"])
    if params["lr_mode"] == "function" and not callable(params["lr_schedule_function"]):
        raise _error("lr_schedule_function", "must be a callable when lr_mode is 'function'")
    if params["warmup_mode"] == "linear_epoch_step" and params["lr_warmup_epochs"] == 0:
        raise _error("warmup_mode", "'linear_epoch_step' needs lr_warmup_epochs > 0")
    if params["warmup_mode"] == "linear_batch_step" and params["lr_warmup_epochs"] == 0 and params["lr_warmup_steps"] == 0:
        raise _error("warmup_mode", "'linear_batch_step' needs lr_warmup_steps > 0 or lr_warmup_epochs > 0")
    if params["lr_warmup_epochs"] + params["lr_cooldown_epochs"] > params["max_epochs"]:
        raise _error("lr_warmup_epochs", "plus lr_cooldown_epochs must not exceed max_epochs")
    phase_callbacks = params["phase_callbacks"]
    if phase_callbacks is None:
        params["phase_callbacks"] = []
    elif not isinstance(phase_callbacks, (list, tuple)):
        raise _error("phase_callbacks", f"must be a list of callbacks, got {type(phase_callbacks).__name__}")
    for key in ("zero_weight_decay_on_bias_and_bn", "greater_metric_to_watch_is_better", "ema",
                "average_best_models", "resume", "resume_weights_only", "silent_mode", "progress_bar",
                "stop_on_non_finite_loss"):
        if not isinstance(params[key], bool):
            raise _error(key, f"must be true or false, got {params[key]!r}")
    if not isinstance(params["metric_to_watch"], str):
        raise _error("metric_to_watch", f"must be a metrics_dict key (a string), got {params['metric_to_watch']!r}")
    if params["resume_path"] is not None:
        params["resume"] = True
