"""What the checkpoint checksum costs: writing with and without hashing, reading with and without verifying.

Run from the repository root::

    .venv/bin/python benchmarks/checkpoint_checksum.py            # ~100M parameters (800 MB file), 4 repetitions
    .venv/bin/python benchmarks/checkpoint_checksum.py --quick    # ~10M parameters, smoke run

Method:

- State: ``--layers`` square ``nn.Linear(width, width)`` layers, fp32, with SGD momentum buffers (about 8 bytes per
  parameter on disk), as in ``checkpoint_stall.py``.
- Serialize: ``torch.save`` into a file that discards the bytes, against ``save_with_checksum`` into it: the CPU
  cost of hashing alone, without the disk's noise.
- Write: ``atomic_write(path, torch.save)`` (what 0.2 did) against ``save_checkpoint`` (the same, hashing the bytes
  as they are written and storing the digest in the file). Both fsync. Either runs on the writer thread in
  training; the training thread's stall (the host copy) is the same with or without the checksum.
- Read: ``torch.load(path)`` against ``read_checkpoint`` (one extra read of the file to hash it, then
  ``torch.load`` of the open file) and against ``verify_checksum`` alone. The file was just written, so reads come
  from the page cache: the numbers are the CPU cost, not the disk's.
- Repetitions alternate the two kinds; medians are shown.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from typing import Callable, List, Optional, Sequence

import torch
import torch.nn as nn

from super_trainer.checkpoint import read_checkpoint, save_checkpoint
from super_trainer.checksum import save_with_checksum, verify_checksum
from super_trainer.files import atomic_write


def state_of(width: int, layers: int) -> dict:
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(width, width) for _ in range(layers)])
    opt = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)
    model(torch.randn(2, width)).square().mean().backward()
    opt.step()
    return {"format": "super_trainer/1", "net": model.state_dict(), "optimizer_state_dict": opt.state_dict(),
            "epoch": 1}


class Discard:
    """A file that drops what it is given: serialization and hashing without the disk."""

    def write(self, data: object) -> int:
        return memoryview(data).nbytes

    def flush(self) -> None:
        pass


def timed(into: List[float], fn: Callable[[], object]) -> None:
    t0 = time.perf_counter()
    fn()
    into.append(time.perf_counter() - t0)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="~10M parameters")
    parser.add_argument("--width", type=int, default=None, help="Linear width (default 5000, quick 1600)")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--reps", type=int, default=4)
    parser.add_argument("--dir", default=None, help="where the files are written (default: system temp dir)")
    args = parser.parse_args(argv)
    width = args.width or (1600 if args.quick else 5000)
    torch.set_num_threads(1)
    state = state_of(width, args.layers)
    n_params = sum(t.numel() for t in state["net"].values())
    plain_w, hashed_w, plain_r, checked_r, verify_r, plain_cpu, hashed_cpu = [], [], [], [], [], [], []
    with tempfile.TemporaryDirectory(prefix="st_checksum_", dir=args.dir) as root:
        plain, hashed = os.path.join(root, "plain.pth"), os.path.join(root, "hashed.pth")
        for r in range(args.reps):
            timed(plain_cpu, lambda: torch.save(state, Discard()))
            timed(hashed_cpu, lambda: save_with_checksum(state, Discard()))
            timed(plain_w, lambda: atomic_write(plain, lambda f: torch.save(state, f)))
            timed(hashed_w, lambda: save_checkpoint(state, hashed))
            timed(plain_r, lambda: torch.load(plain, weights_only=True))
            timed(checked_r, lambda: read_checkpoint(hashed, required_keys=()))
            with open(hashed, "rb") as file:
                timed(verify_r, lambda: verify_checksum(file))
            print(f"  round {r + 1}/{args.reps}: write {plain_w[-1]:.2f} / {hashed_w[-1]:.2f} s, read "
                  f"{plain_r[-1]:.2f} / {checked_r[-1]:.2f} s", file=sys.stderr, flush=True)
        size = os.path.getsize(hashed)
    med = statistics.median
    print(f"checkpoint checksum benchmark: torch {torch.__version__}, {os.cpu_count()} CPUs, {platform.machine()}")
    print(f"  state: {args.layers} x Linear({width}, {width}) = {n_params / 1e6:.3g}M fp32 parameters + momentum; "
          f"file {size / 1e6:.0f} MB under {args.dir or tempfile.gettempdir()}; medians of {args.reps}")
    print(f"  serialize, no disk, torch.save:      {med(plain_cpu):6.2f} s")
    print(f"  serialize, no disk, with SHA-256:    {med(hashed_cpu):6.2f} s   (+{med(hashed_cpu) - med(plain_cpu):.2f} s)")
    print(f"  write + fsync, torch.save only:      {med(plain_w):6.2f} s")
    print(f"  write + fsync, with SHA-256:         {med(hashed_w):6.2f} s   (+{med(hashed_w) - med(plain_w):.2f} s)")
    print(f"  read, torch.load:                    {med(plain_r):6.2f} s")
    print(f"  read, read_checkpoint (verified):    {med(checked_r):6.2f} s   (+{med(checked_r) - med(plain_r):.2f} s)")
    print(f"  verify_checksum alone:               {med(verify_r):6.2f} s   ({size / 1e6 / med(verify_r):.0f} MB/s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
