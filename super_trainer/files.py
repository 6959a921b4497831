"""Atomic file writes: every file the package writes (checkpoints, recipe and params YAML, CSV, PNG) goes through
:func:`atomic_write`, so a crash leaves the previous file or the new one, never a truncated one."""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import IO, Callable, Union

__all__ = ["atomic_write", "atomic_write_text", "atomic_copy"]

PathLike = Union[str, "os.PathLike[str]"]


def atomic_write(path: PathLike, write: Callable[[IO[bytes]], None]) -> Path:
    """``write(file)`` into a temp file beside ``path``, fsync it, rename it over ``path``, fsync the directory:
    a crash leaves the old file or the new one, never a truncated one; a failed write removes its temp file."""
    path = Path(path)
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


def atomic_write_text(path: PathLike, text: str) -> Path:
    """:func:`atomic_write` of ``text`` encoded as UTF-8."""
    data = text.encode("utf-8")
    return atomic_write(path, lambda file: file.write(data))


def atomic_copy(source: PathLike, path: PathLike) -> Path:
    """Copy a finished file to ``path`` with the same temp + fsync + rename as :func:`atomic_write`."""

    def copy(file: IO[bytes]) -> None:
        with open(source, "rb") as src:
            shutil.copyfileobj(src, file, 16 * 1024 * 1024)

    return atomic_write(path, copy)


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
