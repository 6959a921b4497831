"""Run dirs (SPEC §8 "Checkpoint management"), as in SuperGradients 3.7: every ``train()`` call writes into a run dir
``<ckpt_root_dir>/<experiment_name>/RUN_<YYYYMMDD>_<HHMMSS>_<microseconds>/`` (``run_id`` picks another name), so a
new run never touches an earlier run's files, and holds a lock on it while it trains.

Which run dir a ``train()`` call uses (:func:`choose_run`):

- a fresh run: a new ``RUN_…`` dir, or ``run_id``'s (which must not hold files yet);
- ``resume: true``: the latest ``RUN_…`` dir (by name) holding ``ckpt_name``, or ``run_id``'s;
- ``resume_path``: that file, into a new run dir (or ``run_id``'s);
- a 0.2 experiment dir (``ckpt_latest.pth`` directly in ``<ckpt_root_dir>/<experiment_name>/``, no run dir with a
  checkpoint): resumed from that file into a new run dir, leaving the old files as they are.

The lock (:class:`RunLock`) is an exclusive ``flock`` on ``<run dir>/.lock``, which holds the owner's pid and host:
another process (or another Trainer of this process) that would write into the dir fails before any batch with
:class:`RunLockedError` naming them. The kernel releases the lock when its owner dies, so a lock left by a dead
process is taken over, with a warning naming that process.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import socket
import time
import warnings
from datetime import datetime
from pathlib import Path
from typing import Any, List, Mapping, Optional

import torch.distributed as dist

from . import distributed
from .elastic import AUTO, resume_decision

try:  # POSIX; elsewhere the lock falls back to checking the owner's pid
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

__all__ = ["RUN_PREFIX", "LOCK_FILE", "RunChoice", "RunLock", "RunLockedError", "new_run_id", "run_dirs",
           "latest_run_dir", "choose_run", "LEGACY_NOTE"]

logger = logging.getLogger("super_trainer")

RUN_PREFIX = "RUN_"
LOCK_FILE = ".lock"
LEGACY_NOTE = "docs/checkpoints.md, 'Migrating from the 0.2 layout'"


class RunLockedError(RuntimeError):
    """The run dir is locked by another live process (or another Trainer of this one); the message names it."""


def new_run_id() -> str:
    """SuperGradients' run dir name: ``RUN_<YYYYMMDD>_<HHMMSS>_<microseconds>`` of now (sorts by start time)."""
    return datetime.now().strftime(f"{RUN_PREFIX}%Y%m%d_%H%M%S_%f")


def run_dirs(experiment_dir: Path) -> List[Path]:
    """The experiment's ``RUN_…`` dirs, oldest first (their names sort by start time)."""
    if not experiment_dir.is_dir():
        return []
    return sorted(p for p in experiment_dir.iterdir() if p.is_dir() and p.name.startswith(RUN_PREFIX))


def latest_run_dir(experiment_dir: Path, ckpt_name: str = "ckpt_latest.pth", needs: str = "") -> Optional[Path]:
    """The latest ``RUN_…`` dir that holds ``ckpt_name`` (and ``needs``, when given), as SuperGradients'
    ``get_latest_run_id``: newer run dirs without it (a run that failed before its first checkpoint) are skipped
    with a warning."""
    for directory in reversed(run_dirs(experiment_dir)):
        if (directory / ckpt_name).is_file() and (not needs or (directory / needs).is_file()):
            return directory
        warnings.warn(f"run dir {directory} holds no {ckpt_name}{' and ' + needs if needs else ''}, so it cannot "
                      "be resumed; looking at the run before it", stacklevel=3)
    return None


@dataclasses.dataclass(frozen=True)
class RunChoice:
    """The run dir a ``train()`` call writes into, and the checkpoint it resumes from (None: a fresh start)."""

    directory: Path
    checkpoint: Optional[Path] = None

    @property
    def run_id(self) -> str:
        return self.directory.name


def choose_run(experiment_dir: Path, params: Mapping[str, Any]) -> RunChoice:
    """Which run dir to train in and what to resume from (reads only; see the module docstring)."""
    run_id, resume_path, ckpt_name = params.get("run_id"), params.get("resume_path"), params["ckpt_name"]
    resume = params.get("resume")
    if resume == AUTO:  # under torchrun's elastic agent: continue only a run the agent restarted
        resume = _auto_resume(experiment_dir, run_id, ckpt_name)
    resume = bool(resume) or resume_path is not None
    directory = experiment_dir / (run_id if run_id is not None else _unused_run_id(experiment_dir))
    if resume_path is not None:
        return RunChoice(directory, Path(resume_path))
    if not resume:
        if run_id is not None and _holds_files(directory):
            raise ValueError(f"training_params.run_id: {str(directory)!r} already holds a run; set resume: true to "
                             "continue it, or choose another run_id (a new run never touches an earlier run's files)")
        return RunChoice(directory)
    if run_id is not None:
        found = directory / ckpt_name
        if found.is_file():
            return RunChoice(directory, found)
        warnings.warn(f"resume=True but {found} does not exist yet; training from scratch in {directory}",
                      stacklevel=3)
        return RunChoice(directory)
    latest = latest_run_dir(experiment_dir, ckpt_name)
    if latest is not None:
        return RunChoice(latest, latest / ckpt_name)
    legacy = experiment_dir / ckpt_name
    if legacy.is_file():  # the 0.2 layout: continued in a new run dir, the old files left as they are
        logger.info("resuming %s from %s (the 0.2 layout) into the new run dir %s (%s)", experiment_dir.name, legacy,
                    directory, LEGACY_NOTE)
        return RunChoice(directory, legacy)
    warnings.warn(f"resume=True but no run of {str(experiment_dir)!r} holds {ckpt_name} yet; training from scratch "
                  f"in {directory}", stacklevel=3)
    return RunChoice(directory)


def _auto_resume(experiment_dir: Path, run_id: Optional[str], ckpt_name: str) -> bool:
    """``resume: auto``: whether torchrun's elastic agent restarted this job and the checkpoint a resume would read
    exists (every rank takes part: the agents' restart counts and the file's presence are compared over the ranks)."""
    if run_id is not None:
        candidate = experiment_dir / run_id / ckpt_name
    else:
        with warnings.catch_warnings():  # latest_run_dir warns about skipped dirs again if the resume goes ahead
            warnings.simplefilter("ignore")
            latest = latest_run_dir(experiment_dir, ckpt_name)
        candidate = (latest or experiment_dir) / ckpt_name
    decision = resume_decision(AUTO, candidate.is_file(), str(candidate))
    logger.info("%s", decision.reason)
    return decision.resume


def agree_on_run(choice: RunChoice, context: Any) -> RunChoice:
    """Under torchrun every rank chose a run dir before the process group existed (a fresh run's name is the
    time of the choice): all take rank 0's, and ``context.ckpt_dir`` follows."""
    if not distributed.is_distributed():
        return choice
    shared = [choice]
    dist.broadcast_object_list(shared, src=0)
    if shared[0] != choice:
        context.trainer_update(ckpt_dir=shared[0].directory)
    return shared[0]


def _unused_run_id(experiment_dir: Path) -> str:
    """A new run's name that no dir of the experiment has (two starts in one microsecond get two names)."""
    while True:
        name = new_run_id()
        if not (experiment_dir / name).exists():
            return name
        time.sleep(1e-6)


def _holds_files(directory: Path) -> bool:
    return directory.is_dir() and any(True for _ in directory.iterdir())


# ---- the lock -------------------------------------------------------------------------------------------

class RunLock:
    """An exclusive lock on a run dir for as long as this process trains in it (see the module docstring).

    ``acquire()`` creates the dir if needed; :class:`RunLockedError` when a live process holds it. ``release()``
    removes the lock file. Used as a context manager around a run."""

    def __init__(self, directory: Path, enabled: bool = True) -> None:
        self.directory = Path(directory)
        self.path = self.directory / LOCK_FILE
        self.enabled = enabled  # under torchrun only rank 0, the process that writes, takes it
        self._fd: Optional[int] = None
        self._created: List[Path] = []  # dirs acquire() made: removed again when a failed start leaves them empty

    def __enter__(self) -> "RunLock":
        refusal: Optional[RunLockedError] = None
        try:
            self.acquire()
        except RunLockedError as err:
            refusal = err
        if distributed.is_distributed():  # rank 0 locks; every rank stops when it could not, before any collective
            shared = [str(refusal) if refusal is not None else None]
            dist.broadcast_object_list(shared, src=0)
            if shared[0] is not None and refusal is None:
                refusal = RunLockedError(shared[0])
        if refusal is not None:
            raise refusal
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()

    def acquire(self) -> None:
        if not self.enabled:
            return
        self._created = _missing_dirs(self.directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        for _ in range(10):  # retried only when the file was replaced between open and lock (its owner released)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                previous = self._lock(fd)
            except BaseException:
                os.close(fd)
                raise
            if _same_file(fd, self.path):
                break
            os.close(fd)
        else:  # pragma: no cover - ten owners in a row released while we looked
            raise RunLockedError(f"run dir {self.directory}: could not take its lock {self.path}; retry")
        self._fd = fd
        _HELD.add(self.directory)
        if previous and not _is_us(previous):
            warnings.warn(f"run dir {self.directory}: taking over the lock left by pid {previous.get('pid')} on "
                          f"{previous.get('host')!r} (started {previous.get('started')}), which no longer runs",
                          stacklevel=3)
        # the owner's record only names who holds the lock (the flock is the lock, and the kernel drops it when its
        # owner dies): no fsync, which would cost a disk flush at every start and protect nothing a crash needs
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps(_owner()).encode())

    def _lock(self, fd: int) -> Optional[dict]:
        """Lock ``fd`` without waiting; returns the previous owner's record (None when there was none)."""
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return _read_owner(fd)
            except BlockingIOError:
                raise RunLockedError(self._message(_read_owner(fd))) from None
            except OSError:  # a file system without flock: fall back to the pid check below
                pass
        previous = _read_owner(fd)
        alive = previous and previous.get("host") == socket.gethostname() and _alive(previous.get("pid"))
        if alive and (not _is_us(previous) or self.directory in _HELD):
            raise RunLockedError(self._message(previous))
        return previous

    def _message(self, owner: Optional[dict]) -> str:
        owner = owner or {}
        pid, host = owner.get("pid", "?"), owner.get("host", "?")
        who = "this process (another Trainer)" if _is_us(owner) else f"pid {pid} on host {host!r}"
        return (f"run dir {self.directory} is in use by {who}, training since {owner.get('started', '?')}: another "
                f"process may not write into it; wait for it to end or stop it (kill {pid}), or train in a new run "
                "(resume: false, or another run_id)")

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)  # while still locked, so no one takes a lock on a file being removed
        finally:
            os.close(self._fd)  # closing releases the flock
            self._fd = None
            _HELD.discard(self.directory)
        for directory in self._created:  # deepest first; only empty ones go (a run that failed to start)
            try:
                directory.rmdir()
            except OSError:
                break

    @property
    def held(self) -> bool:
        return self._fd is not None


_HELD: set = set()  # run dirs this process holds (for the pid fallback, which cannot tell two Trainers apart)


def _missing_dirs(directory: Path) -> List[Path]:
    """``directory`` and those of its parents that do not exist, deepest first (the walk stops at the first that
    exists: its own parents exist too)."""
    missing = []
    for path in (directory, *directory.parents):
        if path.exists():
            break
        missing.append(path)
    return missing


def _owner() -> dict:
    return {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}


def _is_us(owner: Mapping[str, Any]) -> bool:
    return owner.get("pid") == os.getpid() and owner.get("host") == socket.gethostname()


def _read_owner(fd: int) -> Optional[dict]:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        text = os.read(fd, 4096).decode("utf-8", "replace").strip()
        return json.loads(text) if text else None
    except (OSError, ValueError):
        return {"pid": "?", "host": "?", "started": "?"}


def _same_file(fd: int, path: Path) -> bool:
    try:
        return os.fstat(fd).st_ino == os.stat(path).st_ino
    except FileNotFoundError:
        return False


def _alive(pid: Any) -> bool:
    if not isinstance(pid, int):
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # a live process of another user
        return True
    return True
