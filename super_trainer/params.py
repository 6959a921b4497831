"""``training_params``: resolving and validating them (SPEC §2); the defaults are in ``param_defaults.py``.

Every mistake raises ``ValueError`` before the first batch, naming the key and what would be valid.
"""
from __future__ import annotations

import copy
import difflib
import enum
import math
import numbers
from collections.abc import Mapping as MappingABC
from collections.abc import Sequence as SequenceABC
import warnings
from typing import Any, Callable, FrozenSet, Mapping, Optional

import numpy as np
import torch

from .lr_modes import normalize_lr_mode, normalize_warmup_mode
from .elastic import normalize_resume
from .fsdp import checked_fsdp_params
from .param_defaults import (DEFAULT_TRAINING_PARAMS, EMA_DEFAULTS, HYDRA_KEYS, MIXED_PRECISION_VALUES, REQUIRED,
                             SG_LOGGERS, SG_NO_OP_VALUES, SG_RECIPE_KEYS, SG_UNSUPPORTED_DEFAULTS,
                             TORCH_COMPILE_OPTIONS)
from .params_runs import settle_max_epochs, validate_run_keys
from .registry import close_matches, to_plain

__all__ = ["DEFAULT_TRAINING_PARAMS", "SG_UNSUPPORTED_DEFAULTS", "SG_NO_OP_VALUES", "SG_RECIPE_KEYS", "REQUIRED",
           "TrainingParams", "resolve_training_params", "NAMED_OPTIMIZER_KEYS", "is_named_optimizers"]


class TrainingParams(dict):
    """The resolved training_params: a dict that also allows attribute access (``params.max_epochs``).

    ``defaulted``: the keys that took their default because they were not given (set by
    :func:`resolve_training_params`; empty for a TrainingParams built by hand). Not a key, so not in the YAML."""

    defaulted: FrozenSet[str] = frozenset()

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


_PLAIN_TYPES = frozenset((bool, int, float, str))


def plain_value(value: Any, other: Callable[[Any], str]) -> Any:
    """``value`` (a training_params entry) as plain data: None, bools, numbers and strings as they are (subclasses,
    and numpy scalars and 0-d arrays, as their plain type), mappings as dicts with str keys, lists and tuples as
    lists, enums as their name, and any other object as ``other(value)`` (the params YAML writes its repr, a
    checkpoint its type's name)."""
    kind = type(value)
    if value is None or kind in _PLAIN_TYPES:  # first: most entries, and the cheapest check
        return value
    if kind is dict or isinstance(value, MappingABC):  # collections.abc: typing.Mapping's check is ~10x slower
        return {str(k): plain_value(v, other) for k, v in value.items()}
    if kind is list or isinstance(value, (list, tuple)):
        return [plain_value(v, other) for v in value]
    if isinstance(value, enum.Enum):  # e.g. a Phase (a str enum): its name, as OmegaConf writes it
        return value.name
    if type(value).__module__ == "numpy" and getattr(value, "shape", None) == ():  # np.float32(0.1), np.int64(7)
        return plain_value(value.item(), other)  # numpy's own bool, int, float or str
    for plain in (bool, int, float, str):  # subclasses (numpy's bool_ is not one) as their plain value
        if isinstance(value, plain):
            return plain(value)
    return other(value)


def _fresh(default: Any) -> Any:
    return default if default is None or type(default) in (bool, int, float, str) else copy.deepcopy(default)


def resolve_training_params(given: Any) -> TrainingParams:
    """Merge ``given`` (dict or DictConfig) over the defaults and validate; ValueError names the bad key."""
    if isinstance(given, TrainingParams):  # already resolved (the Trainer resolves first, to choose the run dir)
        resolved = TrainingParams(given)
        resolved.defaulted = given.defaulted
        return resolved
    if given is None:
        raise ValueError("training_params is required (at least {'max_epochs': N, 'initial_lr': lr})")
    given = to_plain(given)
    if not isinstance(given, MappingABC):
        raise ValueError(f"training_params must be a dict or DictConfig, got {type(given).__name__}")
    given = {k: v for k, v in given.items() if k not in HYDRA_KEYS}
    _check_keys(given)
    # no run shares a mutable default (copied only where not given: a deepcopy of every default was most of this)
    params = TrainingParams({key: given[key] if key in given else _fresh(value)
                             for key, value in DEFAULT_TRAINING_PARAMS.items()})
    params.update(given)
    settle_max_epochs(params, REQUIRED)  # optional when max_steps is given
    for key, value in params.items():
        if value is REQUIRED:
            raise _error(key, "is required")
    _validate(params)
    params.defaulted = frozenset(key for key in DEFAULT_TRAINING_PARAMS if key not in given)
    # None: "auto" under torchrun's elastic agent (a restarted job continues from its checkpoint), else False
    params["resume"] = normalize_resume(params["resume"])
    params["fsdp_params"] = checked_fsdp_params(params["fsdp_params"])
    return params


def _close_key(key: str) -> Optional[str]:
    """A known key that ``key`` is plausibly a typo of, or None (a hint to an unrelated key misleads)."""
    known = list(DEFAULT_TRAINING_PARAMS) + list(SG_UNSUPPORTED_DEFAULTS) + list(SG_NO_OP_VALUES) + list(SG_RECIPE_KEYS)
    found = difflib.get_close_matches(key.lower(), known, n=1, cutoff=0.8)
    return found[0] if found and abs(len(found[0]) - len(key)) <= 3 else None


def _check_keys(given: Mapping[str, Any]) -> None:
    """Unknown keys, and SuperGradients keys set to a feature super_trainer lacks: one ValueError for all."""
    unknown = [str(k) for k in given if k not in DEFAULT_TRAINING_PARAMS and k not in SG_UNSUPPORTED_DEFAULTS
               and k not in SG_NO_OP_VALUES and k not in SG_RECIPE_KEYS]
    if len(unknown) == 1:
        hint = _close_key(unknown[0])
        raise ValueError(f"training_params: unknown key {unknown[0]!r}" + (f"; did you mean {hint!r}?" if hint else
                         " (docs/training_params.md lists every key)"))
    if unknown:
        described = [repr(k) + (f" (did you mean {_close_key(k)!r}?)" if _close_key(k) else "") for k in unknown]
        raise ValueError(f"training_params: unknown keys {', '.join(described)} (docs/training_params.md lists "
                         "every key)")
    unsupported = []
    for key, off in SG_UNSUPPORTED_DEFAULTS.items():
        if key in given and not _same(given[key], off):
            unsupported.append(f"{key}={given[key]!r} (SG's default: {off!r})")
    for key, values in SG_NO_OP_VALUES.items():
        if key in given and not any(_same(given[key], v) for v in values):
            unsupported.append(f"{key}={given[key]!r} (supported: {', '.join(map(repr, values))})")
    if unsupported:
        raise ValueError(
            "training_params: these SuperGradients keys are not supported by super_trainer with these values: "
            + "; ".join(unsupported) + ". Remove them or set them to SG's default "
            "(docs/migrating_from_supergradients.md)")


def _same(value: Any, default: Any) -> bool:
    return type(value) is type(default) and value == default if isinstance(default, bool) else value == default


def _lr_updates(params: TrainingParams) -> None:
    """lr_updates: any sequence of epoch numbers (list, tuple, numpy array, numpy numbers) → a list of ints (floats for
    non-integral epochs, which a decay passes once the epoch is ≥ them); or computed from step_lr_update_freq the way
    SuperGradients does."""
    updates = params["lr_updates"]
    if updates is None:
        updates = []
    if isinstance(updates, MappingABC) and "_target_" in updates:  # SG recipes: {_target_: numpy.arange, ...}
        from .sg_compat import instantiate  # SG's own {_target_: ...empty_list} resolves without SG installed

        try:
            updates = instantiate(dict(updates))
        except Exception as err:  # hydra wraps the target's own error
            raise _error("lr_updates", f"cannot build {dict(updates)!r}: {str(err).splitlines()[0]}") from None
    if isinstance(updates, (str, bytes, MappingABC)) or not isinstance(updates, (SequenceABC, np.ndarray)):
        raise _error("lr_updates", f"must be a sequence of epoch numbers (ints), got {updates!r}")
    values = np.asarray(updates).reshape(-1).tolist() if isinstance(updates, np.ndarray) else list(updates)
    for u in values:
        if isinstance(u, (bool, np.bool_)) or not isinstance(u, numbers.Real) or not math.isfinite(u) or u < 0:
            raise _error("lr_updates", f"must be a sequence of epoch numbers >= 0, got {u!r} in {updates!r}")
    # whole numbers as ints; others kept, as SG compares them (SG's mobilenetv2 recipe: numpy.arange(2.4, 450, 2.4))
    params["lr_updates"] = [int(u) if float(u).is_integer() else float(u) for u in values]
    freq = params["step_lr_update_freq"]
    if freq is None:
        return
    _number(params, "step_lr_update_freq")
    if params["lr_updates"]:
        raise _error("step_lr_update_freq", "and lr_updates are mutually exclusive; give one of them")
    if params["lr_mode"] != "step":
        raise _error("step_lr_update_freq", f"applies only to lr_mode 'step', got lr_mode {params['lr_mode']!r}")
    # SG: a decay every `freq` epochs, at ceil(freq·x) for x = 1, 2, ..., within [W, M - C)
    end = params["max_epochs"] - params["lr_cooldown_epochs"]
    epochs = (math.ceil(freq * x) for x in range(1, end))
    params["lr_updates"] = [e for e in epochs if params["lr_warmup_epochs"] <= e < end]


def _compile_options(params: TrainingParams) -> None:
    options = params["torch_compile_options"]
    if options is None:
        options = params["torch_compile_options"] = {}
    if not isinstance(options, MappingABC):
        raise _error("torch_compile_options", f"must be a mapping of torch.compile arguments, got {options!r}")
    unknown = sorted(set(options) - set(TORCH_COMPILE_OPTIONS))
    if unknown:
        raise _error("torch_compile_options",
                     f"unknown torch.compile arguments {unknown}; valid: {list(TORCH_COMPILE_OPTIONS)}")
    mode = params["torch_compile_mode"]
    if mode is not None:
        if not isinstance(mode, str):
            raise _error("torch_compile_mode", f"must be a torch.compile mode name or None, got {mode!r}")
        if options.get("mode") not in (None, mode):
            raise _error("torch_compile_mode", f"{mode!r} contradicts torch_compile_options.mode {options['mode']!r}")
    params["torch_compile_options"] = dict(options)


def _validate(params: TrainingParams) -> None:
    validate_run_keys(params)
    _validate_optimizer(params)
    _validate_numbers(params)
    _validate_logging_and_files(params)
    _validate_schedule_and_flags(params)


#: The keys of one entry of ``optimizer: {name: {...}}`` (several optimizers, SPEC §8).
NAMED_OPTIMIZER_KEYS = ("optimizer", "initial_lr", "optimizer_params", "params")


def is_named_optimizers(optimizer: Any) -> bool:
    """``optimizer: {name: {optimizer, initial_lr, optimizer_params, params}}`` (or ``{name: Optimizer}``), as
    opposed to ``{Name: {kwargs}}``; its entries are checked when they are built (``named_optimizers.py``)."""
    return isinstance(optimizer, MappingABC) and bool(optimizer) and any(
        isinstance(v, torch.optim.Optimizer) or (isinstance(v, MappingABC) and set(v) & set(NAMED_OPTIMIZER_KEYS))
        for v in optimizer.values())


def _validate_optimizer(params: TrainingParams) -> None:
    _int(params, "max_epochs", 1, optional=params["max_steps"] is not None)
    optimizer = params["optimizer"]
    if is_named_optimizers(optimizer):
        return
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
    elif isinstance(initial_lr, bool) or not isinstance(initial_lr, (int, float)) or initial_lr < 0:
        # 0 is valid, as torch and SG take it (e.g. a warmup from warmup_initial_lr, or a schedule that sets the lr)
        raise _error("initial_lr", f"must be a number >= 0 or {{param-name prefix: lr, 'default': lr}}, got {initial_lr!r}")
    if not (is_instance or isinstance(optimizer, str) or (isinstance(optimizer, MappingABC) and len(optimizer) == 1)
            or (isinstance(optimizer, type) and issubclass(optimizer, torch.optim.Optimizer))):
        raise _error("optimizer", f"must be a torch.optim name ('SGD', 'AdamW', ...), {{Name: {{params}}}}, class or "
                                  f"instance, got {optimizer!r}")


def _validate_numbers(params: TrainingParams) -> None:
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
    _number(params, "warmup_momentum", positive=False, optional=True)
    _number(params, "warmup_bias_lr", positive=False, optional=True)
    if "multiply_head_lr" in params:
        _number(params, "multiply_head_lr", positive=False)
    if "static_assigner_end_epoch" in params:
        _int(params, "static_assigner_end_epoch", 0, optional=True)
    _number(params, "lr_decay_factor", positive=False)
    _number(params, "cosine_final_lr_ratio", positive=False)


def _validate_logging_and_files(params: TrainingParams) -> None:
    if params["mixed_precision"] not in MIXED_PRECISION_VALUES:
        raise _error("mixed_precision", f"must be one of {list(MIXED_PRECISION_VALUES)}, got {params['mixed_precision']!r}")
    sg_logger = params["sg_logger"]
    if not (sg_logger in SG_LOGGERS or hasattr(sg_logger, "add_scalar")):
        raise _error("sg_logger", f"must be one of {list(SG_LOGGERS)} or a logger object, got {sg_logger!r} "
                                  "(SuperGradients' other loggers are not supported)")
    if sg_logger == "base_sg_logger":
        params["sg_logger"] = "tensorboard"  # SG's default logger: TensorBoard + experiment.log
    if params["sg_logger_params"] is None:
        params["sg_logger_params"] = {}
    if not isinstance(params["sg_logger_params"], MappingABC):
        raise _error("sg_logger_params", f"must be a mapping, got {params['sg_logger_params']!r}")
    for key in ("ckpt_name", "ckpt_best_name"):
        name = params[key]
        if not isinstance(name, str) or not name or "/" in name or "\\" in name:
            raise _error(key, f"must be a file name inside the run dir, got {name!r}")
    if params["ckpt_best_name"] == "ckpt_latest.pth":
        raise _error("ckpt_best_name", "must differ from ckpt_latest.pth, which holds the latest checkpoint")
    _compile_options(params)
    epochs = params["save_ckpt_epoch_list"] or []
    if not all(isinstance(e, int) and not isinstance(e, bool) and e >= 1 for e in epochs):
        raise _error("save_ckpt_epoch_list", f"must be a list of epoch counts >= 1, got {epochs!r}")
    params["save_ckpt_epoch_list"] = list(epochs)


def _validate_schedule_and_flags(params: TrainingParams) -> None:
    params["lr_mode"] = normalize_lr_mode(params["lr_mode"])
    params["warmup_mode"] = normalize_warmup_mode(params["warmup_mode"])
    _lr_updates(params)
    if params["lr_mode"] == "function" and not callable(params["lr_schedule_function"]):
        raise _error("lr_schedule_function", "must be a callable when lr_mode is 'function'")
    _warn_about_warmup(params)
    phase_callbacks = params["phase_callbacks"]
    if phase_callbacks is None:
        params["phase_callbacks"] = []
    elif not isinstance(phase_callbacks, (list, tuple)):
        raise _error("phase_callbacks", f"must be a list of callbacks, got {type(phase_callbacks).__name__}")
    greater = params["greater_metric_to_watch_is_better"]
    if not (greater is None or isinstance(greater, bool)):
        raise _error("greater_metric_to_watch_is_better", "must be true, false, or unset (None: false when "
                     f"metric_to_watch is a loss, else true), got {greater!r}")
    for key in ("zero_weight_decay_on_bias_and_bn", "ema", "load_opt_params", "average_best_models",
                "resume_weights_only", "silent_mode", "progress_bar", "distributed_sampler", "fsdp",
                "stop_on_non_finite_loss", "save_model", "sync_bn", "torch_compile", "torch_compile_loss"):
        if not isinstance(params[key], bool):
            raise _error(key, f"must be true or false, got {params[key]!r}")
    if not isinstance(params["metric_to_watch"], str):
        raise _error("metric_to_watch", f"must be a metrics_dict key (a string), got {params['metric_to_watch']!r}")
    if params["resume_path"] is not None:
        params["resume"] = True


def _warn_about_warmup(params: TrainingParams) -> None:
    """Warmup settings SuperGradients 3.7 runs although they do less than they seem to: each gives one warning, and
    the run does what SG does (a short smoke run of a long recipe stays possible)."""
    W, S, C, M = (params[k] for k in ("lr_warmup_epochs", "lr_warmup_steps", "lr_cooldown_epochs", "max_epochs"))
    mode = params["warmup_mode"]
    if mode in ("linear_epoch_step", "yolov5_warmup") and W == 0 and S:
        # SG's default warmup_mode with only lr_warmup_steps (e.g. its DEKR recipe): no warmup, the schedule waits S steps
        warnings.warn(f"training_params.warmup_mode {mode!r} (an epoch warmup; LinearEpochLRWarmup is SG's default) with "
                      f"lr_warmup_steps={S} and no lr_warmup_epochs runs no warmup, as in SuperGradients: the lr stays at "
                      "initial_lr until the schedule starts after those steps; for a warmup over steps use warmup_mode "
                      "'linear_batch_step'", stacklevel=4)
    if M is not None and W + C > M:  # None with max_steps alone: derived once the loader is counted
        warnings.warn(f"training_params.lr_warmup_epochs={W} + lr_cooldown_epochs={C} exceed max_epochs={M}: this run ends "
                      "before the lr schedule starts (fine for a smoke run of a longer recipe)", stacklevel=4)
    given = [k for k in ("warmup_momentum", "warmup_bias_lr") if params[k] is not None]
    if given and mode != "yolov5_warmup":
        warnings.warn(f"training_params.{' and '.join(given)} take effect only with warmup_mode 'yolov5_warmup'; with "
                      f"warmup_mode {mode!r} they are ignored, as SuperGradients 3.7 ignores them", stacklevel=4)
