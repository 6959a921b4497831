"""Writing and reading checkpoints (SPEC §3).

A checkpoint is a dict with at least ``net`` (unwrapped model state_dict), ``epoch`` (completed epochs),
``acc`` (metric_to_watch of the last validation), ``best_metric``, ``optimizer_state_dict``,
``scaler_state_dict``, ``ema_net``, ``callbacks``, ``rng_state``, ``lr_scheduler_state`` (plus
``global_step`` and ``format``). Writes go to a temp file in the same directory, are fsynced, then renamed
over the target, so a crash leaves either the old file or the new one, never a truncated one.
:class:`CheckpointWriter` does the same writes from a background thread, after copying the state to host memory,
so the training thread only pays for the copy.
"""
from __future__ import annotations

import atexit
import copy
import logging
import os
import queue
import random
import shutil
import tempfile
import threading
import warnings
import weakref
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn as nn

__all__ = [
    "CheckpointError",
    "REQUIRED_KEYS",
    "save_checkpoint",
    "CheckpointWriter",
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
    "prune_epoch_checkpoints",
    "epoch_checkpoints_to_prune",
]

PathLike = Union[str, "os.PathLike[str]"]

#: Keys every super_trainer training checkpoint has.
REQUIRED_KEYS: Tuple[str, ...] = (
    "net", "epoch", "acc", "best_metric", "optimizer_state_dict", "scaler_state_dict", "ema_net",
    "callbacks", "rng_state", "lr_scheduler_state",
)
FORMAT = "super_trainer/1"
#: Name of CheckpointWriter's background thread (to find it in a thread dump or from a test).
WRITER_THREAD_NAME = "super_trainer-ckpt-writer"


class CheckpointError(RuntimeError):
    """A checkpoint file is missing, truncated, or not a super_trainer checkpoint. The message names the path."""


def unwrap_model(model: nn.Module) -> nn.Module:
    """The plain module inside DistributedDataParallel / DataParallel / torch.compile wrappers."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        else:
            return model


def save_checkpoint(state: Mapping[str, Any], path: PathLike) -> Path:
    """Write ``state`` to ``path`` atomically (temp file + fsync + rename). Returns the path."""
    return _write_atomically(Path(path), lambda file: torch.save(dict(state), file))


def _copy_file_atomically(source: Path, path: Path) -> Path:
    """Copy a finished checkpoint file to ``path`` with the same temp + fsync + rename as save_checkpoint."""

    def copy(file: Any) -> None:
        with open(source, "rb") as src:
            shutil.copyfileobj(src, file, 16 * 1024 * 1024)

    return _write_atomically(path, copy)


def _write_atomically(path: Path, write: Callable[[Any], None]) -> Path:
    """``write(file)`` into a temp file beside ``path``, fsync it, rename it over ``path``, fsync the directory:
    a crash leaves the old file or the new one, never a truncated one; a failed write removes its temp file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as tmp:
            write(tmp)
            tmp.flush()
            os.fsync(tmp.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        try:
            os.unlink(tmp_name)
        except FileNotFoundError:
            pass
        raise
    _fsync_dir(path.parent)
    return path


def _fsync_dir(directory: Path) -> None:
    # The rename is durable only once the directory entry is on disk; not every OS lets us open a dir.
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# Objects a host copy can share with the live state: nothing can change them in place.
_IMMUTABLE = (type(None), bool, int, float, complex, str, bytes, torch.dtype, torch.device, range)
_SCALARS = frozenset((type(None), bool, int, float, str))


class _HostCopier:
    """Copies a nested state to host memory. Tensors are copied into buffers taken from ``pool`` (in traversal
    order) when shape and dtype match: rewriting memory that is already mapped is about 3x faster than a fresh
    allocation. CUDA tensors go to pinned buffers with non_blocking copies, and ``finish()`` synchronizes once."""

    def __init__(self, pool: Optional[List[torch.Tensor]] = None) -> None:
        self._memo: Dict[int, torch.Tensor] = {}  # id(tensor) -> its copy: a tensor reached twice is copied once
        self._pool = list(pool or [])
        self.buffers: List[torch.Tensor] = []  # the buffers this copy filled, in traversal order: the next pool
        self._devices: set = set()

    def copy(self, obj: Any) -> Any:
        if isinstance(obj, torch.Tensor):
            if id(obj) not in self._memo:
                self._memo[id(obj)] = self._copy_tensor(obj)
            return self._memo[id(obj)]
        if isinstance(obj, _IMMUTABLE):
            return obj
        if isinstance(obj, dict):  # also OrderedDict (a state_dict's _metadata survives copy.copy) and defaultdict
            out = copy.copy(obj)
            for key, value in obj.items():
                out[key] = self.copy(value)
            return out
        if isinstance(obj, list):
            out = copy.copy(obj)
            if not all(type(value) in _SCALARS for value in obj):  # fast path: e.g. Python's RNG state
                out[:] = [self.copy(value) for value in obj]
            return out
        if isinstance(obj, tuple):
            if all(type(value) in _SCALARS for value in obj):
                return obj  # immutable all the way down
            items = [self.copy(value) for value in obj]
            if type(obj) is tuple:
                return tuple(items)
            return type(obj)(*items) if hasattr(obj, "_fields") else type(obj)(items)  # namedtuple, torch.Size
        if isinstance(obj, (set, frozenset)):
            return type(obj)(self.copy(value) for value in obj)
        if isinstance(obj, np.ndarray):
            return obj.copy()
        return copy.deepcopy(obj)

    def _copy_tensor(self, tensor: torch.Tensor) -> torch.Tensor:
        tensor = tensor.detach()
        plain = type(tensor) is torch.Tensor and tensor.layout == torch.strided and not tensor.is_quantized
        if not plain or tensor.device.type not in ("cpu", "cuda"):
            return tensor.to("cpu", copy=True)  # sparse, quantized, subclasses, other devices: a fresh copy
        pinned = tensor.is_cuda
        buffer = self._buffer(tensor, pinned)
        buffer.copy_(tensor, non_blocking=pinned)
        if pinned:
            self._devices.add(tensor.device)
        return buffer

    def _buffer(self, tensor: torch.Tensor, pinned: bool) -> torch.Tensor:
        index = len(self.buffers)
        buffer = self._pool[index] if index < len(self._pool) else None
        fits = buffer is not None and buffer.shape == tensor.shape and buffer.dtype == tensor.dtype
        if not fits or buffer.is_pinned() != pinned:
            buffer = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=pinned)
        self.buffers.append(buffer)
        return buffer

    def finish(self) -> None:
        """Wait for the non_blocking device-to-host copies (once per device)."""
        for device in self._devices:
            torch.cuda.synchronize(device)


def copy_to_host(state: Any) -> Any:
    """A copy of ``state`` that later training cannot change: every tensor copied to CPU memory (a real copy,
    also for CPU tensors), dicts, lists, tuples and sets rebuilt, numpy arrays copied, other objects deep-copied.
    A tensor reached twice is copied once."""
    copier = _HostCopier()
    result = copier.copy(state)
    copier.finish()
    return result


class CheckpointWriter:
    """Writes checkpoints from a background thread, so training only waits for a copy of the state.

    ``save(state, *paths)`` copies every tensor of ``state`` to host memory on the calling thread (CUDA tensors
    into pinned buffers, non_blocking, one synchronize), then the writer's thread writes the copy to the
    first path with :func:`save_checkpoint` (temp file + fsync + rename) and copies that file to the other paths,
    each atomically. Training may change the live tensors as soon as ``save`` returns.

    At most one write is in flight: ``save`` first waits for the previous one. An exception of a background
    write is logged when it happens and raised (once) by the next ``save``, ``flush`` or ``close``. A write in
    flight completes before the interpreter exits (an atexit hook waits for it), also after Ctrl-C; only a hard
    kill loses it, leaving the previous file. Files are replaced atomically, so a reader sees the previous
    complete file until the new one lands; call ``flush()`` (or :func:`wait_for_writes`) before reading a file
    that must hold the latest save. Use from one thread; ``close()`` it (or use ``with``) to end its thread.

    ``reuse_buffers`` (default True) keeps the host buffers of one save for the next (a save waits for the previous
    write, so they are free again): the copy then rewrites memory that is already mapped (and pinned), about 3x
    faster than allocating it, at the cost of holding one host copy of the state until ``close()``.
    """

    def __init__(self, reuse_buffers: bool = True) -> None:
        self.reuse_buffers = reuse_buffers
        self._thread: Optional[threading.Thread] = None  # started at the first save, ended by close()
        self._jobs: "queue.SimpleQueue[Any]" = queue.SimpleQueue()
        self._idle = threading.Event()  # set while no write is in flight
        self._idle.set()
        self._error: Optional[BaseException] = None
        self._buffers: List[torch.Tensor] = []
        self._closed = False

    def save(self, state: Mapping[str, Any], *paths: PathLike) -> None:
        """Copy ``state`` to host memory now and write it to every path in the background."""
        self.save_many([(state, paths)])

    def save_many(self, jobs: Sequence[Tuple[Mapping[str, Any], Sequence[PathLike]]],
                  remove: Sequence[PathLike] = ()) -> None:
        """``save`` for several states at once, in one background job (e.g. ckpt_latest and a ckpt_best holding
        other weights): a tensor shared by the states is copied and held once. Written in the order given.
        ``remove``: files deleted (when present) once every write of the job succeeded, e.g. checkpoints beyond
        a keep limit, so a failed write never leaves fewer complete checkpoints than before."""
        if self._closed:
            raise RuntimeError("CheckpointWriter.save called after close()")
        planned = [(state, [Path(p) for p in paths]) for state, paths in jobs]
        for _, paths in planned:
            if not paths:
                raise ValueError("CheckpointWriter.save needs at least one path per state")
        removed = [Path(p) for p in remove]
        clash = {str(p) for p in removed} & {str(p) for _, paths in planned for p in paths}
        if clash:
            raise ValueError(f"CheckpointWriter.save_many: {sorted(clash)} both written and removed")
        self.flush()
        copier = _HostCopier(self._buffers)
        self._buffers = []
        host_jobs = [(copier.copy(dict(state)), paths) for state, paths in planned]
        copier.finish()
        if self.reuse_buffers:
            self._buffers = copier.buffers
        if self._thread is None or not self._thread.is_alive():  # first save, or a fork() left no thread
            # A daemon thread started once: a new thread per save would make every save wait until the OS
            # schedules it (milliseconds on a loaded machine). The atexit hook lets the last write finish.
            self._thread = threading.Thread(target=self._run, name=WRITER_THREAD_NAME, daemon=True)
            self._thread.start()
            _LIVE_WRITERS.add(self)
        self._idle.clear()
        self._jobs.put((host_jobs, removed))

    def _run(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            try:
                self._write(*job)
            finally:
                del job  # drop the host copy before reporting idle
                self._idle.set()

    def _write(self, jobs: List[Tuple[Dict[str, Any], List[Path]]], remove: List[Path]) -> None:
        path = None
        try:
            for state, paths in jobs:
                path = paths[0]
                save_checkpoint(state, path)
                for path in paths[1:]:
                    _copy_file_atomically(paths[0], path)
            for path in remove:
                path.unlink(missing_ok=True)
        except BaseException as err:  # handed to the training thread by flush()
            note = f"raised while writing checkpoint {path} in the background"
            if hasattr(err, "add_note"):
                err.add_note(note)
            logging.getLogger("super_trainer").error("%s: %s: %s (raised again at the next save or close)",
                                                     note, type(err).__name__, err)
            self._error = err

    @property
    def busy(self) -> bool:
        """True while a background write is in flight."""
        return not self._idle.is_set()

    def flush(self) -> None:
        """Wait until the write in flight, if any, is on disk; raise its exception if it failed."""
        self._idle.wait()
        error, self._error = self._error, None
        if error is not None:
            raise error

    def close(self) -> None:
        """``flush()``, then end the thread, refuse further saves and free the host buffers."""
        try:
            self.flush()
        finally:
            self._closed = True
            self._buffers = []
            if self._thread is not None and self._idle.is_set():
                self._jobs.put(None)
                self._thread.join()
                self._thread = None
                _LIVE_WRITERS.discard(self)

    def __enter__(self) -> "CheckpointWriter":
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()


_LIVE_WRITERS: "weakref.WeakSet[CheckpointWriter]" = weakref.WeakSet()


def wait_for_writes() -> None:
    """Wait until every CheckpointWriter's write in flight is on disk (their errors stay for their next
    ``save``/``flush``/``close``). Runs at interpreter exit, so no started write is lost to a normal exit."""
    for writer in list(_LIVE_WRITERS):
        writer._idle.wait()


atexit.register(wait_for_writes)


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


def get_rng_state() -> Dict[str, Any]:
    """Python, NumPy, torch and CUDA RNG states, made of types ``weights_only`` loading accepts."""
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state: Dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {
            "name": np_name,
            "keys": torch.from_numpy(np_keys.astype(np.int64)),
            "pos": int(np_pos),
            "has_gauss": int(np_has_gauss),
            "cached_gaussian": float(np_gauss),
        },
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Restore what get_rng_state() returned."""
    python_state = state["python"]
    random.setstate((python_state[0], tuple(python_state[1]), python_state[2]))
    np_state = state["numpy"]
    np.random.set_state(
        (
            np_state["name"],
            np_state["keys"].numpy().astype(np.uint32),
            np_state["pos"],
            np_state["has_gauss"],
            np_state["cached_gaussian"],
        )
    )
    torch.set_rng_state(state["torch"])
    cuda_states = state.get("cuda") or []
    if cuda_states and torch.cuda.is_available():
        if len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda_states)
        else:
            warnings.warn(
                f"checkpoint has {len(cuda_states)} CUDA RNG states but {torch.cuda.device_count()} GPUs are "
                "visible; CUDA RNG not restored",
                stacklevel=2,
            )


def check_callback_states(callbacks: Any) -> None:
    """Every stateful callback's state must load back with ``weights_only=True``; otherwise no checkpoint of
    the run could be resumed. Checked once, at the first write, naming the callback's state_key."""
    import io

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


def prune_epoch_checkpoints(directory: PathLike, keep: Any) -> None:
    """Delete the oldest ``ckpt_epoch_<N>.pth`` files beyond the newest ``keep`` (None keeps all)."""
    for path in epoch_checkpoints_to_prune(directory, keep):
        path.unlink(missing_ok=True)
