"""Background checkpoint writes: :class:`CheckpointWriter` copies the state to host memory on the training thread
and writes it from its own thread, so training only pays for the copy (SPEC §3: writes stay atomic)."""
from __future__ import annotations

import atexit
import collections
import copy
import io
import logging
import queue
import threading
import weakref
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch

from .checksum import save_with_checksum, write_with_checksum
from .files import PathLike, atomic_copy, atomic_write

__all__ = ["CheckpointWriter", "copy_to_host", "wait_for_writes", "WRITER_THREAD_NAME"]

#: Name of CheckpointWriter's background thread (to find it in a thread dump or from a test).
WRITER_THREAD_NAME = "super_trainer-ckpt-writer"

#: States with at most this many bytes of tensors are serialized by ``save`` itself, on the calling thread.
SERIALIZE_HERE_BYTES = 1 << 20


# Objects a host copy can share with the live state: nothing can change them in place.
_IMMUTABLE = (type(None), bool, int, float, complex, str, bytes, torch.dtype, torch.device, range)


_SCALARS = frozenset((type(None), bool, int, float, str))


class _HostCopier:
    """Copies a nested state to host memory. CUDA tensors go to pinned buffers with non_blocking copies, taken from
    ``pool`` (in traversal order) when shape and dtype match (pinning memory is slow), and ``finish()`` synchronizes
    once. CPU tensors are copied into fresh memory: a pool of ordinary buffers held across saves would be faster to
    copy into (~2x), but holding them changes how glibc's allocator reuses freed memory, and every later training
    step of a CPU model then page-faults its gradients afresh (measured: ~4000 page faults and +11 % per step of a
    4M-parameter MLP)."""

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
        if not pinned:
            return torch.empty(tensor.shape, dtype=tensor.dtype)
        index = len(self.buffers)
        buffer = self._pool[index] if index < len(self._pool) else None
        fits = buffer is not None and buffer.shape == tensor.shape and buffer.dtype == tensor.dtype
        if not fits or not buffer.is_pinned():
            buffer = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
        self.buffers.append(buffer)
        return buffer

    def finish(self) -> None:
        """Wait for the non_blocking device-to-host copies (once per device)."""
        for device in self._devices:
            torch.cuda.synchronize(device)


def _tensor_bytes(obj: Any) -> int:
    """Bytes of the tensors in a nested state of dicts, lists and tuples (a tensor reached twice counts twice)."""
    if isinstance(obj, torch.Tensor):
        return obj.nelement() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_tensor_bytes(value) for value in obj.values())
    if isinstance(obj, (list, tuple)) and not all(type(value) in _SCALARS for value in obj):
        return sum(_tensor_bytes(value) for value in obj)
    return 0


def _serialized(state: Dict[str, Any]) -> bytes:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue()


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
    into pinned buffers, non_blocking, one synchronize), then the writer's thread serializes the copy and writes it
    to the first path with :func:`~super_trainer.files.atomic_write` and ``torch.save`` (temp file + fsync + rename),
    hashing the bytes as they are written (the SHA-256 that :func:`~super_trainer.checkpoint.read_checkpoint`
    verifies), and copies that file to the other paths, each atomically. Training may change the live tensors as
    soon as ``save`` returns. A small state (at most ``SERIALIZE_HERE_BYTES`` of tensors, 1 MiB) is instead
    serialized by ``save`` itself into bytes, and only those are written in the background: pickling holds the
    GIL, and for a small state it is most of the work, so on the writer's thread it would only stall the training
    thread at some batch after the save (measured: 3 us per step of a 5k-parameter MLP on CPU); the write, hash,
    fsync and rename, which release the GIL, stay in the background. The directory must exist unless
    ``make_dirs=True``: by default a run dir deleted while training is an error, never recreated.

    At most one write is in flight: ``save`` first waits for the previous one. An exception of a background
    write is logged when it happens, kept in ``failure`` (cheap to poll: the trainer reads it after every batch)
    and raised (once) by the next ``save``, ``flush`` or ``close``. The thread is
    a daemon, so an idle writer never holds up the interpreter's exit; a write in flight still completes before
    the interpreter exits (an atexit hook waits for it), also after Ctrl-C; only a hard kill loses it, leaving
    the previous file. Files are replaced atomically, so a reader sees the previous
    complete file until the new one lands; call ``flush()`` (or :func:`wait_for_writes`) before reading a file
    that must hold the latest save. Use from one thread; ``close()`` it (or use ``with``) to end its thread.

    ``reuse_buffers`` (default True) keeps the pinned host buffers of one save (CUDA tensors' copies) for the next
    (a save waits for the previous write, so they are free again): pinning memory is slow, and the copy then
    rewrites memory that is already mapped and pinned, at the cost of holding one host copy of the state until
    ``close()``. CPU tensors are always copied into fresh memory (see ``_HostCopier``).

    ``report_written`` (default False): after each job whose files are all complete on disk, the writer's thread
    appends the job's paths (a list, in write order) to ``written``, a deque the caller pops from its own thread
    (the trainer fires ``on_checkpoint_saved`` from it). A failed job is not reported.

    ``save_many(..., hold=True)`` is for a run's last checkpoint, which the caller waits for anyway: a small state
    is serialized and then held, and the next ``flush``, ``close`` or ``save`` writes it on the calling thread,
    saving the hand-offs to the writer's thread and that thread's start and end (~0.6 ms of a short run). A larger
    state is written in the background as usual.
    """

    def __init__(self, reuse_buffers: bool = True, make_dirs: bool = False, report_written: bool = False) -> None:
        self.reuse_buffers = reuse_buffers
        self.make_dirs = make_dirs
        self.report_written = report_written
        self.written: "collections.deque[List[Path]]" = collections.deque()  # appended by the writer's thread
        self._thread: Optional[threading.Thread] = None  # started at the first save, ended by close()
        self._jobs: "queue.SimpleQueue[Any]" = queue.SimpleQueue()
        self._idle = threading.Event()  # set while no write is in flight
        self._idle.set()
        # a failed background write, until flush() raises it; read without a lock (the trainer checks it every batch)
        self.failure: Optional[BaseException] = None
        self._buffers: List[torch.Tensor] = []
        self._closed = False
        self._held: Optional[Tuple[List[Tuple[Any, List[Path]]], List[Path]]] = None  # save_many(hold=True)'s job

    def save(self, state: Mapping[str, Any], *paths: PathLike) -> None:
        """Copy ``state`` to host memory now and write it to every path in the background."""
        self.save_many([(state, paths)])

    def save_many(self, jobs: Sequence[Tuple[Mapping[str, Any], Sequence[PathLike]]],
                  remove: Sequence[PathLike] = (), hold: bool = False, on_host: bool = False) -> None:
        """``save`` for several states at once, in one background job (e.g. ckpt_latest and a ckpt_best holding
        other weights): a tensor shared by the states is copied and held once. Written in the order given.
        ``remove``: files deleted (when present) once every write of the job succeeded, e.g. checkpoints beyond
        a keep limit, so a failed write never leaves fewer complete checkpoints than before. ``hold``: a small
        state waits for the next :meth:`flush` (see the class docstring). ``on_host``: the states are already a
        private host copy (:func:`copy_to_host`) that nothing changes: written as they are, not copied again."""
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
        if sum(_tensor_bytes(state) for state, _ in planned) <= SERIALIZE_HERE_BYTES:  # read each time: tests set 0
            # Pickling holds the GIL throughout, and for a small state it is most of the write: on the writer's
            # thread it would stall the training thread at some batch of the next epoch (a few us per step of
            # a small model); here it costs its time once, at the checkpoint. The bytes are immutable: no copy.
            host_jobs: List[Tuple[Any, List[Path]]] = [(_serialized(dict(state)), paths) for state, paths in planned]
            if hold:
                self._held = (host_jobs, removed)
                _HOLDING.add(self)  # a strong reference: the atexit hook writes it if nothing else does
                return
        elif on_host:
            host_jobs = [(dict(state), paths) for state, paths in planned]
        else:
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
            except BaseException as err:  # handed to the training thread by flush()
                logging.getLogger("super_trainer").error("%s: %s: %s (raised again on the training thread)",
                                                         "; ".join(getattr(err, "__notes__", ())),
                                                         type(err).__name__, err)
                self.failure = err
            finally:
                del job  # drop the host copy before reporting idle
                self._idle.set()

    def _write(self, jobs: List[Tuple[Any, List[Path]]], remove: List[Path]) -> None:
        path = None
        try:
            for state, paths in jobs:
                path = paths[0]
                write = write_with_checksum if isinstance(state, bytes) else save_with_checksum
                atomic_write(path, lambda file: write(state, file), make_dirs=self.make_dirs)
                for path in paths[1:]:
                    atomic_copy(paths[0], path, make_dirs=self.make_dirs)
            for path in remove:
                path.unlink(missing_ok=True)
            if self.report_written:  # deque.append is atomic: the reading thread needs no lock
                self.written.append([p for _, paths in jobs for p in paths])
        except BaseException as err:
            where = "in the background" if threading.current_thread() is self._thread else "on the calling thread"
            if hasattr(err, "add_note"):
                err.add_note(f"raised while writing checkpoint {path} {where}")
            raise

    @property
    def busy(self) -> bool:
        """True while a background write is in flight."""
        return not self._idle.is_set()

    def wait(self) -> None:
        """Wait until the write in flight, if any, is on disk; raise its exception if it failed. A held job stays
        held."""
        self._idle.wait()
        error, self.failure = self.failure, None
        if error is not None:
            raise error

    def flush(self) -> None:
        """Everything saved so far on disk: :meth:`wait`, then write a held job on this thread; an exception of
        either is raised here."""
        self.wait()
        held, self._held = self._held, None
        if held is not None:
            _HOLDING.discard(self)
            self._write(*held)

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
_HOLDING: "set[CheckpointWriter]" = set()  # writers with a held job, until it is written


def wait_for_writes() -> None:
    """Wait until every CheckpointWriter's write in flight is on disk (their errors stay for their next
    ``save``/``flush``/``close``), then write every held job (``save_many(hold=True)``; an error is logged). Runs at
    interpreter exit, so no saved checkpoint is lost to a normal exit."""
    for writer in list(_LIVE_WRITERS):
        writer._idle.wait()
    for writer in list(_HOLDING):  # a held last checkpoint whose run never reached its end (an exit mid-run)
        try:
            writer.flush()
        except Exception:  # noqa: BLE001 - logged; the exit goes on
            logging.getLogger("super_trainer").exception("a held checkpoint could not be written at exit")



atexit.register(wait_for_writes)
