"""Atomic file writes: every file the package writes (checkpoints, recipe and params YAML, CSV, PNG) goes through
:func:`atomic_write`, so a crash leaves the previous file or the new one, never a truncated one.

Besides atomicity, a write:

- gets the permission bits a plain ``open(path, "w")`` would give: an existing file keeps its mode, a new one
  gets ``0o666 & ~umask`` (``mkstemp`` alone would leave ``0o600``, unreadable for teammates on a shared cluster);
- never creates its directory unless the caller says so (``make_dirs=True``, for the first write of a run): a run
  dir deleted mid-run is an error, not silently recreated;
- names its temp file after the writing process (host and pid), so the first write into a directory removes the
  temp files that dead writers left there (a SIGKILL during a write leaves a checkpoint-sized one);
- reports a full disk as one line: "no space left", the path, and that the previous file was kept.
"""
from __future__ import annotations

import errno
import os
import re
import shutil
import socket
import threading
import time
from pathlib import Path
from typing import IO, Callable, Optional, Set, Tuple, Union

__all__ = ["atomic_write", "atomic_write_text", "atomic_copy", "remove_stale_temp_files", "STALE_FOREIGN_SECONDS"]

PathLike = Union[str, "os.PathLike[str]"]

#: A temp file of another host (whose process we cannot look up) is removed once unmodified for this long: a
#: live write rewrites its temp file continuously and renames it within seconds to minutes.
STALE_FOREIGN_SECONDS = 24 * 3600

_HOST = re.sub(r"[^A-Za-z0-9_-]", "-", socket.gethostname())[:32] or "host"
# ".<target name>.w<pid>@<host>.<mkstemp's random part>.tmp"
_TEMP_NAME = re.compile(r"^\..+\.w(?P<pid>\d+)@(?P<host>[A-Za-z0-9_-]*)\.[A-Za-z0-9_]+\.tmp$")
_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)

_lock = threading.Lock()
_in_flight: Set[str] = set()  # file names of this process's temp files being written now (any thread)
_swept: Set[str] = set()  # directories already cleared of dead writers' temp files by this process


def atomic_write(path: PathLike, write: Callable[[IO[bytes]], None], make_dirs: bool = False) -> Path:
    """``write(file)`` into a temp file beside ``path``, fsync it, rename it over ``path``, fsync the directory:
    a crash leaves the old file or the new one, never a truncated one; a failed write removes its temp file.

    ``make_dirs``: create missing parent directories (the first write of a run). By default a missing directory
    is a FileNotFoundError naming it, so a run dir deleted while training is not silently recreated.
    """
    path = Path(path)
    directory = path.parent
    if make_dirs:
        directory.mkdir(parents=True, exist_ok=True)
    elif not directory.is_dir():
        raise _missing_dir(path)
    _sweep_once(directory)
    mode = _existing_mode(path)
    try:
        with _lock:  # created and registered at once: a sweep by another thread never sees it unregistered
            fd, tmp_name = _create_temp(path)
            _in_flight.add(os.path.basename(tmp_name))
    except FileNotFoundError:
        raise _missing_dir(path) from None
    except OSError as err:
        if err.errno in _DISK_FULL:
            raise _disk_full(path, err) from err
        raise
    try:
        if mode is not None:  # replacing a file: keep its mode (a new one has 0o666 minus the umask already)
            os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as tmp:
            write(tmp)
            tmp.flush()
            os.fsync(tmp.fileno())
        os.replace(tmp_name, path)
    except BaseException as err:
        _unlink(tmp_name)
        if isinstance(err, OSError) and err.errno in _DISK_FULL:
            raise _disk_full(path, err) from err
        if isinstance(err, FileNotFoundError) and not directory.is_dir():
            raise _missing_dir(path) from err
        if isinstance(err, FileNotFoundError) and not os.path.exists(tmp_name):
            raise _deleted_temp(path, tmp_name) from err
        raise
    finally:
        with _lock:
            _in_flight.discard(os.path.basename(tmp_name))
    _fsync_dir(directory)
    return path


def atomic_write_text(path: PathLike, text: str, make_dirs: bool = False) -> Path:
    """:func:`atomic_write` of ``text`` encoded as UTF-8."""
    data = text.encode("utf-8")
    return atomic_write(path, lambda file: file.write(data), make_dirs=make_dirs)


def atomic_copy(source: PathLike, path: PathLike, make_dirs: bool = False) -> Path:
    """Copy a finished file to ``path`` with the same temp + fsync + rename as :func:`atomic_write`."""

    def copy(file: IO[bytes]) -> None:
        with open(source, "rb") as src:
            shutil.copyfileobj(src, file, 16 * 1024 * 1024)

    return atomic_write(path, copy, make_dirs=make_dirs)


def remove_stale_temp_files(directory: PathLike) -> list:
    """Remove the temp files of :func:`atomic_write` calls whose process is dead; returns the removed paths.

    A temp file names its writer's host and pid. On this host it is stale when no process has that pid, when the
    process with that pid started after the file was last written (the pid was reused: a restarted container),
    or when the pid is this process's and no write of this process uses the file. A temp file of another host
    is stale once unmodified for :data:`STALE_FOREIGN_SECONDS`. Files named otherwise are never touched.
    """
    removed = []
    try:
        entries = list(os.scandir(directory))
    except OSError:
        return removed
    for entry in entries:
        match = _TEMP_NAME.match(entry.name)
        if match is None:
            continue
        try:
            modified = entry.stat(follow_symlinks=False).st_mtime
        except OSError:
            continue  # gone already
        if _writer_is_dead(entry.path, int(match["pid"]), match["host"], modified) and _unlink(entry.path):
            removed.append(Path(entry.path))
    return removed


def _sweep_once(directory: Path) -> None:
    """The first write of this process into ``directory`` removes dead writers' temp files there."""
    key = os.path.abspath(directory)
    with _lock:
        if key in _swept:
            return
        _swept.add(key)
    remove_stale_temp_files(directory)


def _writer_is_dead(path: str, pid: int, host: str, modified: float) -> bool:
    if host != _HOST:
        return time.time() - modified > STALE_FOREIGN_SECONDS
    if pid == os.getpid():
        with _lock:
            return os.path.basename(path) not in _in_flight
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        pass  # alive, another user's
    except OSError:
        return False
    started = _process_start_time(pid)
    return started is not None and started > modified + 1.0  # 1 s: /proc's boot time is whole seconds


def _process_start_time(pid: int) -> Optional[float]:
    """When process ``pid`` started (seconds since the epoch), from /proc; None where /proc is not available."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            fields = stat.read().rsplit(b")", 1)[1].split()
        with open("/proc/stat", "rb") as system:
            boot = next(float(line.split()[1]) for line in system if line.startswith(b"btime"))
        return boot + int(fields[19]) / os.sysconf("SC_CLK_TCK")  # field 22 of stat, counted after "(comm)"
    except (OSError, ValueError, IndexError, StopIteration):
        return None


def _existing_mode(path: Path) -> Optional[int]:
    """The permission bits of the file being replaced (None when there is none)."""
    try:
        return os.stat(path).st_mode & 0o7777
    except OSError:
        return None


def _create_temp(path: Path) -> Tuple[int, str]:
    """A new temp file beside ``path``, opened for writing, named after this writer (host, pid) and a random part.
    Created with mode 0o666, so the kernel applies the umask, as ``open(path, "w")`` would (``mkstemp`` makes 0o600,
    and reading the umask costs a parse of /proc or a racy set-and-restore)."""
    prefix = os.path.join(path.parent, f".{path.name}.w{os.getpid()}@{_HOST}.")
    for _ in range(100):
        name = f"{prefix}{os.urandom(6).hex()}.tmp"
        try:
            return os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o666), name
        except FileExistsError:
            continue
    raise FileExistsError(errno.EEXIST, f"no unused temp file name beside {path}")


def _missing_dir(path: Path) -> FileNotFoundError:
    return FileNotFoundError(errno.ENOENT, f"cannot write {path}: its directory {path.parent} does not exist (was it "
                                           "deleted during the run?); nothing was written")


def _deleted_temp(path: Path, tmp_name: str) -> FileNotFoundError:
    # Something removed our temp file mid-write: usually the run dir being deleted, caught before the dir itself.
    return FileNotFoundError(errno.ENOENT, f"cannot write {path}: its temp file {os.path.basename(tmp_name)} was "
                                           f"removed while being written (is the run dir {path.parent} being "
                                           "deleted?); nothing was written")


def _disk_full(path: Path, err: OSError) -> OSError:
    kept = f"the previous {path.name} was kept unchanged" if path.exists() else f"no {path.name} was written"
    reason = "no space left on device" if err.errno == errno.ENOSPC else "disk quota exceeded (no space left)"
    return OSError(err.errno, f"{reason} while writing {path}; {kept} and the partial temp file was removed")


def _unlink(name: str) -> bool:
    try:
        os.unlink(name)
        return True
    except OSError:  # gone already, or another user's file in a shared dir
        return False


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
