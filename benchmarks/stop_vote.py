"""What the per-micro-batch stop agreement costs under torchrun: ``any_rank_true`` vs ``RankVote``.

Run from the repository root (it launches itself under torchrun, 2 processes, gloo on CPU)::

    .venv/bin/python benchmarks/stop_vote.py                 # 3000 calls per variant (about 30 s)
    .venv/bin/python benchmarks/stop_vote.py --calls 500     # quick
    .venv/bin/python benchmarks/stop_vote.py --nproc 4 --json vote.json

Method: each variant runs ``--calls`` times back to back on every rank after 50 warm-up calls, with a barrier
before each variant; the table shows the median and the 90th percentile of one call (µs) on rank 0. Variants:

Variants run in ``--rounds`` rounds, in an order rotated each round, so a change in machine load hits all
alike.

- ``any_rank_true``: today's primitive, one float32 element, MAX all-reduce, ``.item()``;
- ``RankVote(1)`` / ``RankVote(3)``: one one-element int64 all-reduce carrying 1 or 3 flags as bits (BOR);
- ``MAX of 3 int64``: the same three flags as three elements (what a per-element MAX vote would send);
- ``2 x any_rank_true``: what the loop does per micro-batch today (before backward and at the batch's end);
- ``work then vote`` / ``start, work, result``: ~``--work-us`` of compute (a matmul) then a blocking vote, against
  the same vote started before the work and waited for after it (what ``RankVote.start`` / ``result`` allow).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from typing import Callable, Dict, List

import torch


def _time(fn: Callable[[], object], calls: int) -> List[float]:
    for _ in range(50):
        fn()
    samples = []
    for _ in range(calls):
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1e6)
    return samples


def _worker(args: argparse.Namespace) -> None:
    import torch.distributed as dist

    from super_trainer import distributed

    distributed.init_from_env(torch.device("cpu"))
    one, three = distributed.RankVote(1), distributed.RankVote(3)
    packed = torch.zeros(3, dtype=torch.int64)  # three values as separate elements: gloo's slower path
    a = torch.randn(96, 96)
    reps = max(1, int(args.work_us / 25))  # about 25 µs per 96x96 matmul on one core

    def work() -> None:
        for _ in range(reps):
            a @ a

    def overlapped() -> None:
        three.start(False, False, False)
        work()
        three.result()

    variants: Dict[str, Callable[[], object]] = {
        "any_rank_true": lambda: distributed.any_rank_true(False),
        "RankVote(1)": lambda: one.vote(False),
        "RankVote(3)": lambda: three.vote(False, False, False),
        "MAX of 3 int64": lambda: dist.all_reduce(packed, op=dist.ReduceOp.MAX),
        "2 x any_rank_true": lambda: (distributed.any_rank_true(False), distributed.any_rank_true(False)),
        "work alone": work,
        "work then vote": lambda: (work(), three.vote(False, False, False)),
        "start, work, result": overlapped,
    }
    samples: Dict[str, List[float]] = {name: [] for name in variants}
    names = list(variants)
    for round_ in range(args.rounds):  # rotated order, so drifts in machine load hit every variant alike
        for name in names[round_ % len(names):] + names[:round_ % len(names)]:
            dist.barrier()
            samples[name] += _time(variants[name], max(1, args.calls // args.rounds))
    rows = {name: {"median_us": statistics.median(values), "p90_us": statistics.quantiles(values, n=10)[-1]}
            for name, values in samples.items()}
    if distributed.rank() == 0:
        print(f"{distributed.world_size()} ranks, gloo/CPU, {args.calls} calls per variant, "
              f"torch {torch.__version__}, {os.cpu_count()} CPUs")
        print(f"{'variant':24s} {'median µs':>10s} {'p90 µs':>10s}")
        for name, row in rows.items():
            print(f"{name:24s} {row['median_us']:10.1f} {row['p90_us']:10.1f}")
        if args.json:
            with open(args.json, "w") as handle:
                json.dump(rows, handle, indent=2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=3000)
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--work-us", type=float, default=300.0)
    parser.add_argument("--json", default=None)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        _worker(args)
        return
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={args.nproc}",
               __file__, "--worker", "--calls", str(args.calls), "--rounds", str(args.rounds),
               "--work-us", str(args.work_us)]
    if args.json:
        command += ["--json", os.path.abspath(args.json)]
    sys.exit(subprocess.call(command))


if __name__ == "__main__":
    main()
