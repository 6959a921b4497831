"""How long a checkpoint stalls the training thread: synchronous ``save_checkpoint`` vs ``CheckpointWriter.save``.

Run from the repository root::

    .venv/bin/python benchmarks/checkpoint_stall.py              # ~100M parameters, 4 repetitions (~35 s, ~3 GB RAM)
    .venv/bin/python benchmarks/checkpoint_stall.py --quick      # ~10M parameters, smoke run
    .venv/bin/python benchmarks/checkpoint_stall.py --dir /some/disk --json stall.json

Method (see benchmarks/README.md):

- Model: ``--layers`` square ``nn.Linear(width, width)`` layers, fp32, trained with SGD + momentum for two steps
  so the checkpoint holds weights and one momentum buffer per parameter (about 8 bytes per parameter on disk),
  plus the small entries the trainer writes (epoch, metrics, RNG state).
- Synchronous: time of ``save_checkpoint(state, path)`` (serialize, fsync, rename; building the state dict is
  not timed, in either case): the training thread waits for all of it, as it did before ``CheckpointWriter``.
- Writer: time of ``writer.save(state, path)`` — the host copy of every tensor plus starting the thread: all the
  training thread waits for. The first save maps fresh host memory; later ones (every checkpoint after a run's
  first) get memory the allocator already has from the previous copy, which is faster, so the first is reported
  on its own and the ratio uses the later ones. (On a GPU the pinned buffers are kept from one save to the next;
  CPU copies are never kept: see ``checkpoint_writer._HostCopier``.)
  The background write is then timed until ``flush()`` returns, while the training
  thread keeps running training steps; their median time is compared with steps run with no write in flight (on a
  machine with few cores the background thread competes with training for the CPU, which this shows).
- Both write the same state to the same temp dir (``--dir``, default the system temp dir: a real disk, unlike
  /dev/shm). Repetitions alternate sync and writer, with one training step between; the table shows medians.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from typing import Any, Dict, List, Optional, Sequence

import torch
import torch.nn as nn

from super_trainer.checkpoint import CheckpointWriter, get_rng_state, save_checkpoint


def build(width: int, layers: int, batch: int) -> tuple:
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(width, width) for _ in range(layers)])
    opt = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)
    x = torch.randn(batch, width)

    def step() -> None:
        loss = model(x).square().mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(2):  # creates the momentum buffers
        step()
    return model, opt, step


def state_of(model: nn.Module, opt: torch.optim.Optimizer, epoch: int) -> Dict[str, Any]:
    """What the trainer's checkpoint holds, minus its empty entries."""
    return {"format": "super_trainer/1", "net": model.state_dict(), "epoch": epoch, "global_step": 100 * epoch,
            "acc": 0.5, "best_metric": 0.5, "metrics": {"Accuracy": 0.5}, "history": [{"epoch": epoch}],
            "optimizer_state_dict": opt.state_dict(), "scaler_state_dict": None, "ema_net": None, "callbacks": {},
            "rng_state": get_rng_state(), "lr_scheduler_state": None}


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="~10M parameters, 2 repetitions")
    parser.add_argument("--width", type=int, default=None, help="Linear layer width (default 5000, quick 1600)")
    parser.add_argument("--layers", type=int, default=4, help="number of width x width Linear layers (default 4)")
    parser.add_argument("--reps", type=int, default=None, help="repetitions of each kind of save (default 4)")
    parser.add_argument("--batch", type=int, default=4, help="batch size of the training steps (default 4)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    parser.add_argument("--dir", default=None, help="where the checkpoints are written (default: system temp dir)")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON to PATH")
    args = parser.parse_args(argv)
    width = args.width or (1600 if args.quick else 5000)
    reps = max(2, args.reps or (3 if args.quick else 4))
    torch.set_num_threads(args.threads)

    def log(text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    started = time.perf_counter()
    model, opt, step = build(width, args.layers, args.batch)
    n_params = sum(p.numel() for p in model.parameters())
    idle_steps: List[float] = []

    def timed_step(into: List[float]) -> None:
        t0 = time.perf_counter()
        step()
        into.append(time.perf_counter() - t0)

    sync_s: List[float] = []
    stall_s: List[float] = []
    background_s: List[float] = []
    busy_steps: List[float] = []
    size = 0
    with tempfile.TemporaryDirectory(prefix="st_stall_", dir=args.dir) as root:
        writer = CheckpointWriter()
        for r in range(reps):
            path = os.path.join(root, f"sync_{r}.pth")
            state = state_of(model, opt, r)  # building the dict costs both the same: not timed
            t0 = time.perf_counter()
            save_checkpoint(state, path)
            sync_s.append(time.perf_counter() - t0)
            size = os.path.getsize(path)
            os.unlink(path)
            del state
            timed_step(idle_steps)  # no write in flight

            path = os.path.join(root, f"writer_{r}.pth")
            state = state_of(model, opt, r)
            t0 = time.perf_counter()
            writer.save(state, path)
            del state
            t1 = time.perf_counter()
            stall_s.append(t1 - t0)
            while writer.busy:  # training goes on while the write is in flight
                timed_step(busy_steps)
            writer.flush()
            background_s.append(time.perf_counter() - t1)
            os.unlink(path)
            log(f"  round {r + 1}/{reps}: sync {1e3 * sync_s[-1]:.1f} ms, writer stall {1e3 * stall_s[-1]:.1f} ms, "
                f"background write {1e3 * background_s[-1]:.1f} ms")
        writer.close()
    elapsed = time.perf_counter() - started

    sync, stall = statistics.median(sync_s), statistics.median(stall_s[1:])
    idle = statistics.median(idle_steps)
    busy = statistics.median(busy_steps) if busy_steps else float("nan")
    print(f"checkpoint stall benchmark{' (--quick)' if args.quick else ''}: torch {torch.__version__}, "
          f"{torch.get_num_threads()} thread(s), {os.cpu_count()} CPUs, {platform.machine()}")
    print(f"  model: {args.layers} x Linear({width}, {width}) = {n_params / 1e6:.3g}M fp32 parameters, SGD momentum; "
          f"checkpoint {size / 1e6:.3g} MB, written under {args.dir or tempfile.gettempdir()}; "
          f"medians of {reps} repetitions")
    print()
    print(f"  synchronous save_checkpoint (training waits):        {1e3 * sync:9.1f} ms")
    print(f"  CheckpointWriter.save, first (fresh host memory):    {1e3 * stall_s[0]:9.1f} ms")
    print(f"  CheckpointWriter.save, later:                        {1e3 * stall:9.1f} ms   (training waits: host copy)")
    print(f"  stall ratio sync / writer (later saves):             {sync / stall:8.1f} x   (target >= 5x; "
          f"first save {sync / stall_s[0]:.1f} x)")
    print(f"  background write until flush() returns:              {1e3 * statistics.median(background_s):9.1f} ms")
    print(f"  training step: {1e3 * idle:.1f} ms with no write in flight, {1e3 * busy:.1f} ms during the background "
          f"write ({len(busy_steps)} steps)")
    print(f"wall time {elapsed:.0f} s")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump({"torch": torch.__version__, "threads": torch.get_num_threads(), "cpus": os.cpu_count(),
                       "params": n_params, "ckpt_bytes": size, "dir": args.dir or tempfile.gettempdir(),
                       "sync_s": sync_s, "writer_stall_s": stall_s, "background_s": background_s,
                       "idle_step_s": idle_steps, "busy_step_s": busy_steps, "ratio": sync / stall}, fh, indent=2)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
