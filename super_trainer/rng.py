"""Random number generator state: seeding, saving and restoring (Python, NumPy, torch, CUDA).

A checkpoint stores :func:`get_rng_state` so a resumed run draws the same numbers as an uninterrupted one;
:func:`preserved_rng` lets code that must draw (a dry run of the model, an export check) leave the run's
numbers untouched.
"""
from __future__ import annotations

import contextlib
import ctypes
import random
import struct
import sys
import warnings
from typing import Any, Dict, Iterator, Mapping, Optional, Tuple

import numpy as np
import torch

__all__ = ["seed_everything", "get_rng_state", "set_rng_state", "preserved_rng"]


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's, torch's and (when there are any) every CUDA device's generators."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    # torch.manual_seed also queues a lazy CUDA seeding, which records a traceback (milliseconds) even on a
    # machine without CUDA: seed the CPU generator directly, and CUDA only where it exists.
    torch.default_generator.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def get_rng_state() -> Dict[str, Any]:
    """Python, NumPy, torch and CUDA RNG states, made of types ``weights_only`` loading accepts.

    The generators' words are stored as little-endian ``bytes`` (Python's 624 words and position, NumPy's 624 words,
    torch's state bytes): a bytes object is one pickled object, where a tensor is a zip record of its own (~20 us
    each in ``torch.save``) and a tuple of ints one object per word."""
    py_version, py_keys, py_gauss = random.getstate()
    return {
        "python": (py_version, struct.pack(_PY_WORDS, *py_keys), py_gauss),
        "numpy": _numpy_state(),
        "torch": torch.get_rng_state().numpy().tobytes(),
        "cuda": [state.numpy().tobytes() for state in torch.cuda.get_rng_state_all()]
        if torch.cuda.is_available() else [],
    }


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Restore what :func:`get_rng_state` returned (also the tensors and tuples that older checkpoints hold)."""
    version, keys, gauss = state["python"]
    random.setstate((version, _words(keys), gauss))
    np_state = state["numpy"]
    np_keys = np_state["keys"]
    np_keys = np.frombuffer(np_keys, dtype="<u4") if isinstance(np_keys, bytes) else np_keys.numpy()
    np.random.set_state((np_state["name"], np_keys.astype(np.uint32), np_state["pos"], np_state["has_gauss"],
                         np_state["cached_gaussian"]))
    torch.set_rng_state(_byte_tensor(state["torch"]))
    cuda_states = state.get("cuda") or []
    if cuda_states and torch.cuda.is_available():
        if len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all([_byte_tensor(s) for s in cuda_states])
        else:
            warnings.warn(f"checkpoint has {len(cuda_states)} CUDA RNG states but {torch.cuda.device_count()} GPUs "
                          "are visible; CUDA RNG not restored", stacklevel=2)


_PY_WORDS = "<625I"  # Python's Mersenne Twister: 624 words and the position (at most 624)


def _words(keys: Any) -> Tuple[int, ...]:
    """Python's RNG words from bytes, or from the tensor or tuple of ints that older checkpoints hold."""
    if isinstance(keys, bytes):
        return struct.unpack(_PY_WORDS, keys)
    return tuple(keys.tolist() if isinstance(keys, torch.Tensor) else keys)


def _byte_tensor(state: Any) -> torch.Tensor:
    return torch.frombuffer(bytearray(state), dtype=torch.uint8) if isinstance(state, bytes) else state


class _NumpyState:
    """NumPy's global generator state, read again only when it moved.

    ``np.random.get_state()`` copies MT19937's 624 words one Python object at a time (~30 us, ~100 us with the
    caches cold after a training pass), and a run reads it at every checkpoint and epoch start, while most torch
    pipelines never draw from NumPy's global generator. The generator's raw words and position (its C struct, read
    through NumPy's public ctypes interface in well under a microsecond) show whether it moved since the last read.
    The one change they cannot show is the legacy Gaussian cache (``has_gauss``): a normal draw that uses the cached
    value moves no word, so a read with a value pending is never reused; only ``np.random.set_state`` back to the
    same words with a value pending would go unseen. The raw read is checked against ``get_state()`` once; where
    it differs (another NumPy layout, a big-endian machine, ``np.random.set_bit_generator``), every call reads."""

    def __init__(self) -> None:
        # (raw words and position, the state stored for them) of the last reusable read (no Gaussian pending); one
        # attribute, replaced whole, so a reader in another thread never pairs one read's words with another's state
        self.last: Optional[Tuple[bytes, Dict[str, Any]]] = None
        self.usable: Optional[bool] = None  # the raw read matches get_state() (checked at the first call)

    def __call__(self) -> Dict[str, Any]:
        raw = self._raw() if self.usable is not False else None
        last = self.last
        if raw is not None and last is not None and raw == last[0]:
            return dict(last[1])
        name, keys, pos, has_gauss, gauss = np.random.get_state()
        state = {"name": name, "keys": keys.astype("<u4").tobytes(), "pos": int(pos), "has_gauss": int(has_gauss),
                 "cached_gaussian": float(gauss)}
        if self.usable is None:
            self.usable = raw is not None and raw == state["keys"] + int(pos).to_bytes(4, "little", signed=True)
        self.last = (raw, state) if self.usable and not has_gauss else None
        return dict(state)

    @staticmethod
    def _raw() -> Optional[bytes]:
        generator = getattr(np.random.mtrand._rand, "_bit_generator", None)
        if type(generator).__name__ != "MT19937" or sys.byteorder != "little":
            return None
        return ctypes.string_at(generator.ctypes.state_address, _MT_STATE_BYTES)


_MT_STATE_BYTES = 624 * 4 + 4  # NumPy's mt19937_state: uint32_t key[624]; int pos
_numpy_state = _NumpyState()


@contextlib.contextmanager
def preserved_rng() -> Iterator[None]:
    """Run the block, then put every generator back where it was: the block's draws change no number of the run."""
    state = get_rng_state()
    try:
        yield
    finally:
        set_rng_state(state)
