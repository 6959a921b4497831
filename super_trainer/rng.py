"""Random number generator state: seeding, saving and restoring (Python, NumPy, torch, CUDA).

A checkpoint stores :func:`get_rng_state` so a resumed run draws the same numbers as an uninterrupted one;
:func:`preserved_rng` lets code that must draw (a dry run of the model, an export check) leave the run's
numbers untouched.
"""
from __future__ import annotations

import contextlib
import random
import warnings
from typing import Any, Dict, Iterator, Mapping

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
    """Python, NumPy, torch and CUDA RNG states, made of types ``weights_only`` loading accepts."""
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    py_version, py_keys, py_gauss = random.getstate()
    return {
        # the 625 words of Python's Mersenne Twister as one tensor: pickled as 625 ints they were most of a small
        # checkpoint's serialization time (one persistent_id call per object); np.fromiter reads the tuple 3x
        # faster than torch.tensor
        "python": (py_version, torch.from_numpy(np.fromiter(py_keys, dtype=np.int64, count=len(py_keys))), py_gauss),
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


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Restore what :func:`get_rng_state` returned."""
    python_state = state["python"]
    keys = python_state[1]  # a tensor; a tuple of ints in checkpoints before 0.3.1
    random.setstate((python_state[0], tuple(keys.tolist() if isinstance(keys, torch.Tensor) else keys),
                     python_state[2]))
    np_state = state["numpy"]
    np.random.set_state((np_state["name"], np_state["keys"].numpy().astype(np.uint32), np_state["pos"],
                         np_state["has_gauss"], np_state["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    cuda_states = state.get("cuda") or []
    if cuda_states and torch.cuda.is_available():
        if len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda_states)
        else:
            warnings.warn(f"checkpoint has {len(cuda_states)} CUDA RNG states but {torch.cuda.device_count()} GPUs "
                          "are visible; CUDA RNG not restored", stacklevel=2)


@contextlib.contextmanager
def preserved_rng() -> Iterator[None]:
    """Run the block, then put every generator back where it was: the block's draws change no number of the run."""
    state = get_rng_state()
    try:
        yield
    finally:
        set_rng_state(state)
