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
import re
from pathlib import Path
from typing import IO, Any, Dict, Iterable, List, Mapping, Optional, Tuple

import torch
import torch.nn as nn

from .checksum import ChecksumError, save_with_checksum, verify_checksum
from .checkpoint_writer import WRITER_THREAD_NAME, CheckpointWriter, copy_to_host, wait_for_writes
from .files import PathLike, atomic_write
from .modules import unwrap_model
from .rng import get_rng_state, set_rng_state

__all__ = [
    "CheckpointError",
    "REQUIRED_KEYS",
    "FORMAT",
    "KNOWN_FORMATS",
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

#: ``format`` values this version reads (training checkpoints, AverageBestModels' average_model.pth); another
#: ``"super_trainer/..."`` value is a CheckpointError (another version wrote it). A dict without one (a bare
#: state_dict, a file of your own) is read as is.
KNOWN_FORMATS: Tuple[str, ...] = (FORMAT, "super_trainer/average")


class CheckpointError(RuntimeError):
    """A checkpoint file is missing, truncated, corrupted, or not a super_trainer checkpoint. The message names
    the path."""


def save_checkpoint(state: Mapping[str, Any], path: PathLike, make_dirs: bool = False) -> Path:
    """Write ``state`` to ``path`` atomically (temp file + fsync + rename), with the SHA-256 of its bytes stored in
    the file (verified by :func:`read_checkpoint`). Returns the path. ``make_dirs``: create a missing directory
    (by default a missing directory is a FileNotFoundError naming it)."""
    return atomic_write(path, lambda file: save_with_checksum(dict(state), file), make_dirs=make_dirs)


def read_checkpoint(
    path: PathLike,
    weights_only: bool = True,
    map_location: Any = "cpu",
    required_keys: Iterable[str] = REQUIRED_KEYS,
) -> Dict[str, Any]:
    """Load a checkpoint dict; CheckpointError naming the path when it is missing, a directory, empty,
    truncated, corrupted (its content does not match the checksum written with it), not a torch file, of an
    unknown ``format`` version, or foreign (not a dict, or missing ``required_keys``).

    ``weights_only=True`` (the default) refuses pickled code; pass False only for files you trust. The checksum
    costs one extra read of the file (see docs/checkpoints.md); files without one (super_trainer 0.2, plain
    ``torch.save`` files) load unverified.
    """
    path = Path(path)
    _check_regular_file(path)
    try:
        with open(path, "rb") as file:
            try:
                verified = verify_checksum(file)
            except ChecksumError as err:
                raise CheckpointError(f"checkpoint {path} is corrupted: {err}; it was changed after it was written "
                                      "(disk or transfer error): use another copy (e.g. ckpt_epoch_N.pth)") from None
            if verified is None:
                _check_intact(file, path)
            file.seek(0)
            state = _load(file, path, weights_only, map_location)
    except PermissionError as err:
        raise CheckpointError(f"cannot read checkpoint {path}: permission denied") from err
    if not isinstance(state, dict):
        raise CheckpointError(
            f"{path} is not a super_trainer checkpoint: expected a dict with keys {list(REQUIRED_KEYS)}, "
            f"got {type(state).__name__}"
        )
    found = state.get("format")
    if isinstance(found, str) and found.startswith("super_trainer/") and found not in KNOWN_FORMATS:
        raise CheckpointError(f"checkpoint {path} has format {found!r}, which this super_trainer does not know (it "
                              f"reads {list(KNOWN_FORMATS)}): it was written by another version; upgrade super_trainer")
    missing = [k for k in required_keys if k not in state]
    if missing:
        raise CheckpointError(f"{path} is not a super_trainer checkpoint: missing keys {missing}")
    return state


def _check_regular_file(path: Path) -> None:
    if path.is_dir():
        raise CheckpointError(f"checkpoint {path} is a directory, not a file")
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} is not a regular file")


_ZIP_START = b"PK\x03\x04"
_ZIP_END = b"PK\x05\x06"


def _check_intact(file: IO[bytes], path: Path) -> None:
    """For a file without a checksum: empty, truncated or not a torch file, named before torch.load's own
    messages ("[Errno 22] Invalid argument", a bare EOFError) can hide why."""
    size = file.seek(0, 2)
    if size == 0:
        raise CheckpointError(f"checkpoint {path} is empty (0 bytes): truncated, e.g. by a full disk or a copy "
                              "that did not finish")
    file.seek(0)
    head = file.read(4)
    if head != _ZIP_START:
        if head[:1] == b"\x80":  # a pickle: torch.save's legacy format, read by torch.load as is
            return
        raise CheckpointError(f"{path} is not a checkpoint written by torch.save: it is neither a zip archive nor a "
                              f"pickle (it starts with {head!r})")
    window = min(size, 65536 + 22)  # the end record sits in the last 22 bytes plus its comment (< 64 KiB)
    file.seek(size - window)
    tail = file.read(window)
    end = tail.rfind(_ZIP_END)
    if end < 0 or end + 22 > len(tail):
        raise CheckpointError(f"checkpoint {path} is truncated ({size} bytes): the end of its zip archive is missing")
    comment = int.from_bytes(tail[end + 20:end + 22], "little")
    if end + 22 + comment > len(tail):
        raise CheckpointError(f"checkpoint {path} is truncated ({size} bytes): its zip archive ends early")


#: torch's note on a refused global, with the rest of its paragraph-long message.
_REFUSED_GLOBAL = re.compile(r"Unsupported global: GLOBAL ([\w.]+)")
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _load(file: IO[bytes], path: Path, weights_only: bool, map_location: Any) -> Any:
    try:
        return torch.load(file, map_location=map_location, weights_only=weights_only)
    except Exception as err:
        raise CheckpointError(_load_error(path, err)) from err


def _load_error(path: Path, err: BaseException) -> str:
    """One line, without ANSI codes, saying why torch.load failed and what would help."""
    text = _ANSI.sub("", str(err))
    refused = _REFUSED_GLOBAL.search(text)
    if refused:
        return (f"checkpoint {path} holds an object that weights_only loading refuses ({refused.group(1)}); if you "
                "trust the file, load it with weights_only=False (resume_weights_only: false in training_params, "
                "weights_only=False for load_checkpoint_to_model/read_checkpoint), or allow the class with "
                "torch.serialization.add_safe_globals")
    if "Weights only load failed" in text:  # a pickle weights_only cannot parse: not a refused class
        detail = re.search(r"WeightsUnpickler error:\s*(.+?)\s*(?:\n\n|$)", text, re.S)
        reason = " ".join(detail.group(1).split()) if detail else "unreadable pickle"
        return f"cannot read checkpoint {path}: its pickle is damaged or not written by torch.save ({reason})"
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    first = lines[0] if lines else type(err).__name__
    first = first.split(". This is an internal miniz error")[0]
    return f"cannot read checkpoint {path}: {first} (damaged, or not written by torch.save)"


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
    if state.get("sharded") and state.get(key) is None:
        raise CheckpointError(f"{path} holds its weights as torch.distributed.checkpoint shards in "
                              f"{path.parent / state['sharded']} (fsdp_params.checkpoint: sharded): resume it under "
                              "torchrun, or gather them into one file first with "
                              "torch.distributed.checkpoint.format_utils.dcp_to_torch_save(shard_dir, 'full.pt') "
                              "(its 'model' entry is a plain state_dict)")
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
                              "resume with the same optimizer, or load only the weights (load_opt_params: false, or "
                              "load_checkpoint_to_model)")
    groups = (state.get("optimizer_state_dict") or {}).get("param_groups") or []
    if len(groups) != len(optimizer.param_groups):
        raise CheckpointError(f"checkpoint {path} has {len(groups)} optimizer param groups, this run has "
                              f"{len(optimizer.param_groups)} (do the initial_lr mapping or zero_weight_decay_on_bias_and_bn"
                              " differ, or does a callback add param groups after on_optimizer_built? add them in "
                              "on_optimizer_built so a resume finds them)")
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

