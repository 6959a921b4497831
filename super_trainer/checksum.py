"""A SHA-256 of every checkpoint file's bytes, stored in the file itself and verified when it is read.

``torch.save`` writes a zip archive, whose last record (the 22-byte "end of central directory") may carry a
comment that every zip reader, ``torch.load`` included, skips. :func:`save_with_checksum` hashes the bytes as
``torch.save`` hands them to the file (no second serialization, no re-read), then writes that record with the
comment ``super_trainer:sha256:<64 hex digits>`` (85 bytes). The digest covers every byte of the file before the
comment's 2-byte length field. The file stays a plain torch file: ``torch.load(path, weights_only=True)``,
``mmap=True`` and :mod:`zipfile` read it unchanged.

:func:`verify_checksum` reads the file once more and compares. A file without the comment (a checkpoint of
super_trainer 0.2, or any ``torch.save`` file) is reported as unverified, not as an error. A comment damaged by a
flipped bit is an error: the trailer is recognised when two of its three fixed parts (the record's signature, the
comment length 85, the ``super_trainer:sha256:`` prefix) are intact, and all three must be.
"""
from __future__ import annotations

import hashlib
import re
import struct
from typing import IO, Any, Optional

import torch

__all__ = ["save_with_checksum", "write_with_checksum", "verify_checksum", "ChecksumError", "TRAILER_PREFIX"]

TRAILER_PREFIX = b"super_trainer:sha256:"
_TRAILER_LEN = len(TRAILER_PREFIX) + 64
_END_RECORD = b"PK\x05\x06"  # signature of the zip's end-of-central-directory record
_END_LEN = 22  # its size with no comment; the comment length is its last 2 bytes
_HEX = re.compile(rb"[0-9a-f]{64}")
_CHUNK = 8 * 1024 * 1024


class ChecksumError(ValueError):
    """The file's bytes do not match the checksum stored in it, or the stored checksum is damaged."""


class _HashingWriter:
    """What ``torch.save`` writes into: forwards every byte to ``file`` and hashes it, holding back the last 22
    bytes (the archive's end record) so :meth:`finish` can give it a comment without seeking."""

    def __init__(self, file: IO[bytes]) -> None:
        self._file = file
        self._hash = hashlib.sha256()
        self._tail = b""

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        size = view.nbytes
        if size >= _END_LEN:
            if self._tail:
                self._emit(self._tail)
            self._emit(view[:size - _END_LEN])
            self._tail = bytes(view[size - _END_LEN:])
        else:
            joined = self._tail + bytes(view)
            if len(joined) > _END_LEN:
                self._emit(joined[:-_END_LEN])
            self._tail = joined[-_END_LEN:]
        return size

    def flush(self) -> None:
        self._file.flush()

    def _emit(self, chunk: Any) -> None:
        self._hash.update(chunk)  # hashlib releases the GIL for large chunks: training threads keep running
        self._file.write(chunk)

    def finish(self) -> bool:
        """Write the held-back end record, with the checksum as its comment; False when the stream was not a
        zip archive ending in a comment-less end record (then it is written unchanged, without a checksum)."""
        tail = self._tail
        if len(tail) != _END_LEN or not tail.startswith(_END_RECORD) or tail[-2:] != b"\0\0":
            self._file.write(tail)
            return False
        self._hash.update(tail[:-2])
        trailer = TRAILER_PREFIX + self._hash.hexdigest().encode("ascii")
        self._file.write(tail[:-2] + struct.pack("<H", len(trailer)) + trailer)
        return True


def save_with_checksum(obj: Any, file: IO[bytes]) -> bool:
    """``torch.save(obj, file)`` with the SHA-256 of the bytes stored in the file (see the module docstring).
    ``file`` need not be seekable. Returns whether the checksum was stored."""
    writer = _HashingWriter(file)
    torch.save(obj, writer)
    return writer.finish()


def write_with_checksum(data: bytes, file: IO[bytes]) -> bool:
    """What :func:`save_with_checksum` writes, for ``data`` that ``torch.save`` already wrote into memory (the
    same bytes: the file is identical). Hashing and writing release the GIL for large buffers."""
    writer = _HashingWriter(file)
    writer.write(data)
    return writer.finish()


def verify_checksum(file: IO[bytes]) -> Optional[str]:
    """Check a file written by :func:`save_with_checksum` (opened ``"rb"``, seekable); the hex digest when it
    matches, None when the file holds no checksum, ChecksumError when the bytes or the checksum are damaged."""
    size = file.seek(0, 2)
    start = size - _END_LEN - _TRAILER_LEN
    if start < 0:
        return None
    file.seek(start)
    tail = file.read()
    signature_ok = tail[:4] == _END_RECORD
    length_ok = tail[_END_LEN - 2:_END_LEN] == struct.pack("<H", _TRAILER_LEN)
    prefix_ok = tail[_END_LEN:_END_LEN + len(TRAILER_PREFIX)] == TRAILER_PREFIX
    if signature_ok + length_ok + prefix_ok < 2:
        return None  # no super_trainer checksum: a 0.2 checkpoint or a plain torch.save file
    stored = tail[_END_LEN + len(TRAILER_PREFIX):]
    if not (signature_ok and length_ok and prefix_ok and _HEX.fullmatch(stored)):
        raise ChecksumError(f"its checksum record (the last {_END_LEN + _TRAILER_LEN} bytes) is damaged")
    digest = hashlib.sha256()
    file.seek(0)
    buffer = bytearray(min(_CHUNK, max(size, 1)))
    view = memoryview(buffer)
    remaining = size - _TRAILER_LEN - 2
    while remaining > 0:
        got = file.readinto(view[:min(len(buffer), remaining)])
        if not got:
            raise ChecksumError(f"it shrank below {size} bytes while it was read")
        digest.update(view[:got])
        remaining -= got
    found = digest.hexdigest()
    if found != stored.decode("ascii"):
        raise ChecksumError(f"its content does not match the SHA-256 written with it (stored "
                            f"{stored[:12].decode()}..., found {found[:12]}...)")
    return found
