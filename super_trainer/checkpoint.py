"""Writing and reading checkpoints (SPEC §3).

A checkpoint is a dict with at least ``net`` (unwrapped model state_dict), ``epoch`` (completed epochs),
``acc`` (metric_to_watch of the last validation), ``best_metric``, ``optimizer_state_dict``,
``scaler_state_dict``, ``ema_net``, ``callbacks``, ``rng_state``, ``lr_scheduler_state`` (plus
``global_step`` and ``format``). Writes go through :func:`~super_trainer.files.atomic_write` (temp file, fsync,
rename), so a crash leaves either the old file or the new one, never a truncated one.
:class:`~super_trainer.checkpoint_writer.CheckpointWriter` does the same writes from a background thread.

The writer, the RNG helpers and ``unwrap_model`` live in their own modules and are re-exported here, so
``super_trainer.checkpoint`` stays the one import for everything about checkpoints.
"""
from __future__ import annotations

import io
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Tuple

import torch
import torch.nn as nn

from .checkpoint_writer import WRITER_THREAD_NAME, CheckpointWriter, copy_to_host, wait_for_writes
from .files import PathLike, atomic_write
from .modules import unwrap_model
from .rng import get_rng_state, set_rng_state

__all__ = [
    "CheckpointError",
    "REQUIRED_KEYS",
    "FORMAT",
    "atomic_write",
    "save_checkpoint",
    "CheckpointWriter",
    "WRITER_THREAD_NAME",
    "wait_for_writes",
    "copy_to_host",
    "read_checkpoint",
    "load_checkpoint_to_model",
    "transfer_weights",
    "get_rng_state",
    "set_rng_state",
    "unwrap_model",
    "check_callback_states",
    "check_optimizer_fits",
    "epoch_checkpoints_to_prune",
]

#: Keys every super_trainer training checkpoint has.
REQUIRED_KEYS: Tuple[str, ...] = (
    "net", "epoch", "acc", "best_metric", "optimizer_state_dict", "scaler_state_dict", "ema_net",
    "callbacks", "rng_state", "lr_scheduler_state",
)


FORMAT = "super_trainer/1"


class CheckpointError(RuntimeError):
    """A checkpoint file is missing, truncated, or not a super_trainer checkpoint. The message names the path."""


def save_checkpoint(state: Mapping[str, Any], path: PathLike) -> Path:
    """Write ``state`` to ``path`` atomically (temp file + fsync + rename). Returns the path."""
    return atomic_write(path, lambda file: torch.save(dict(state), file))


def read_checkpoint(
    path: PathLike,
    weights_only: bool = True,
    map_location: Any = "cpu",
    required_keys: Iterable[str] = REQUIRED_KEYS,
) -> Dict[str, Any]:
    """Load a checkpoint dict; CheckpointError naming the path when missing, unreadable or foreign.

    ``weights_only=True`` (the default) refuses pickled code; pass False only for files you trust.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location=map_location, weights_only=weights_only)
    except Exception as err:  # truncated zip, wrong format, refused global, ...
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(
            f"cannot read checkpoint {path}: {first_line} (truncated, not written by torch.save, or "
            "holding objects weights_only=True refuses)"
        ) from err
    if not isinstance(state, dict):
        raise CheckpointError(
            f"{path} is not a super_trainer checkpoint: expected a dict with keys {list(REQUIRED_KEYS)}, "
            f"got {type(state).__name__}"
        )
    missing = [k for k in required_keys if k not in state]
    if missing:
        raise CheckpointError(f"{path} is not a super_trainer checkpoint: missing keys {missing}")
    return state


def _strip_prefixes(state_dict: Mapping[str, Any], model_keys: Iterable[str]) -> Dict[str, Any]:
    """Drop DDP's ``module.`` / torch.compile's ``_orig_mod.`` prefixes that the model does not have."""
    model_keys = set(model_keys)
    result = dict(state_dict)
    for prefix in ("module.", "_orig_mod."):
        if result and all(k.startswith(prefix) for k in result) and not any(k.startswith(prefix) for k in model_keys):
            result = {k[len(prefix):]: v for k, v in result.items()}
    return result


def load_checkpoint_to_model(
    net: nn.Module,
    path: PathLike,
    strict: bool = True,
    load_ema_as_net: bool = False,
    weights_only: bool = True,
) -> Dict[str, Any]:
    """Load the weights of a checkpoint into ``net`` (in place) and return the checkpoint dict.

    Accepts a super_trainer checkpoint (``net`` key, or ``ema_net`` with ``load_ema_as_net=True``) or a bare
    state_dict file. ``strict=False`` allows missing/unexpected keys (shapes must still match).
    """
    path = Path(path)
    key = "ema_net" if load_ema_as_net else "net"
    state = read_checkpoint(path, weights_only=weights_only, required_keys=())
    if key in state:
        weights = state[key]
        if weights is None:
            raise CheckpointError(f"{path} has no {key!r} weights (was the run trained with ema: true?)")
    elif not load_ema_as_net and state and all(isinstance(v, torch.Tensor) for v in state.values()):
        weights = state  # a bare state_dict file
    else:
        raise CheckpointError(f"{path} is not a super_trainer checkpoint: it has no {key!r} key")
    target = unwrap_model(net)
    weights = _strip_prefixes(weights, target.state_dict().keys())
    try:
        target.load_state_dict(weights, strict=strict)
    except RuntimeError as err:
        raise CheckpointError(f"weights in {path} do not fit {type(target).__name__}: {err}") from err
    return state


def transfer_weights(model: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> List[str]:
    """Copy tensors whose name and shape match into ``model``; return the names that were skipped."""
    target = unwrap_model(model)
    own = target.state_dict()
    state_dict = _strip_prefixes(state_dict, own.keys())
    skipped = []
    matched = {}
    for name, tensor in state_dict.items():
        if name in own and own[name].shape == tensor.shape:
            matched[name] = tensor
        else:
            skipped.append(name)
    target.load_state_dict(matched, strict=False)
    return skipped


def check_callback_states(callbacks: Any) -> None:
    """Every stateful callback's state must load back with ``weights_only=True``; otherwise no checkpoint of
    the run could be resumed. Checked once, at the first write, naming the callback's state_key."""
    for key, callback in callbacks.state_keys().items():
        buffer = io.BytesIO()
        try:
            torch.save(callback.state_dict(), buffer)
            buffer.seek(0)
            torch.load(buffer, weights_only=True)
        except Exception as err:
            first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise ValueError(
                f"callback state {key!r} cannot be checkpointed: weights_only loading refuses it ({first_line}); "
                "make state_dict() return only tensors, numbers, strings, lists and dicts"
            ) from None


#: Optimizer hyperparameters torch fills in by itself when a state_dict lacks them (older torch versions).
_OPTIONAL_GROUP_KEYS = {"foreach", "fused", "capturable", "differentiable", "maximize", "decoupled_weight_decay",
                        "initial_lr", "name"}


def check_optimizer_fits(optimizer: torch.optim.Optimizer, state: Mapping[str, Any], path: PathLike) -> None:
    """CheckpointError, before any event, when the checkpoint's optimizer state belongs to another optimizer
    (torch would load it and fail at the first step with a bare KeyError)."""
    saved_type = state.get("optimizer_type")
    this_type = type(optimizer).__name__
    if saved_type is not None and saved_type != this_type:
        raise CheckpointError(f"checkpoint {path} holds {saved_type} state but this run's optimizer is {this_type}; "
                              "resume with the same optimizer, or load only the weights (load_checkpoint_to_model)")
    groups = (state.get("optimizer_state_dict") or {}).get("param_groups") or []
    if len(groups) != len(optimizer.param_groups):
        raise CheckpointError(f"checkpoint {path} has {len(groups)} optimizer param groups, this run has "
                              f"{len(optimizer.param_groups)} (initial_lr mapping or zero_weight_decay_on_bias_and_bn "
                              "differ?)")
    for saved, current in zip(groups, optimizer.param_groups):
        missing = sorted(set(current) - set(saved) - {"params"} - _OPTIONAL_GROUP_KEYS)
        if missing:
            raise CheckpointError(f"checkpoint {path} holds another optimizer's state: its param groups lack "
                                  f"{missing}, which {this_type} needs; resume with the same optimizer")


def epoch_checkpoints_to_prune(directory: PathLike, keep: Any, adding: Optional[PathLike] = None) -> List[Path]:
    """The oldest ``ckpt_epoch_<N>.pth`` files beyond the newest ``keep`` (None keeps all), counting ``adding``
    (a file about to be written) as present."""
    if keep is None:
        return []
    found = {}
    for path in [*Path(directory).glob("ckpt_epoch_*.pth"), *([Path(adding)] if adding is not None else [])]:
        number = path.stem[len("ckpt_epoch_"):]
        if number.isdigit():
            found[int(number)] = path
    return [path for _, path in sorted(found.items())[:-keep]]

