"""Per-step overhead of ``super_trainer.Trainer.train`` against a hand-written PyTorch loop.

Run from the repository root::

    .venv/bin/python benchmarks/overhead.py            # full run (about 80 s on 2 CPU cores)
    .venv/bin/python benchmarks/overhead.py --quick    # smoke run (seconds)
    .venv/bin/python benchmarks/overhead.py --json results.json

Method (see benchmarks/README.md):

- Data is a plain list of pre-built ``(x, y)`` CPU tensors, the same list object for both loops, so no
  DataLoader collation hides (or adds) cost.
- Only the train pass of each epoch is timed. In the trainer two timing callbacks stamp
  ``time.perf_counter()`` at ``on_train_loader_start`` (running after every other listener) and
  ``on_train_loader_end`` (running before every other listener); the hand loop is timed over the same span
  (the batch loop plus the one end-of-epoch host sync). Per-epoch costs outside that span (checkpoint
  writes, logger setup, params YAML) are therefore not counted: this is the per-*step* overhead.
- s/step of an epoch = epoch time / batches. The first epoch of every run is dropped as warm-up; the
  reported value is the median over the remaining epochs of all rounds.
- Every round runs the hand loop and each trainer variant of a model once, in an order rotated each
  round, so drifts in machine speed hit all variants alike.
- torch uses a fixed number of intra-op threads (``--threads``, default 1) for both loops.
- A last line times ``CallbackHandler`` event dispatch directly (timeit), for costs below the noise.
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import timeit
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

import super_trainer
from super_trainer import Callback, CallbackHandler, PhaseContext, Trainer

Batches = List[Tuple[torch.Tensor, torch.Tensor]]

N_CALLBACKS = 50


# ---- model, data ---------------------------------------------------------------------------------

def make_mlp(sizes: Sequence[int], seed: int = 0) -> nn.Module:
    """Linear/ReLU stack over ``sizes`` (no ReLU after the last Linear), with seeded init."""
    torch.manual_seed(seed)
    layers: List[nn.Module] = []
    for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(n_in, n_out))
        if i < len(sizes) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def make_batches(n_in: int, n_classes: int, batch_size: int, n_batches: int, seed: int = 1) -> Batches:
    """Pre-batched in-memory data: a list has len() and yields (inputs, target), so it is a valid loader."""
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch_size, n_in, generator=gen), torch.randint(0, n_classes, (batch_size,), generator=gen))
            for _ in range(n_batches)]


# ---- callbacks -----------------------------------------------------------------------------------

class EpochTimes:
    """Seconds of each epoch's train pass, as seen by the two stamp callbacks below."""

    def __init__(self) -> None:
        self.start = 0.0
        self.seconds: List[float] = []


class _StampStart(Callback):
    priority = 10**6  # lower runs first: this runs after every other on_train_loader_start listener

    def __init__(self, times: EpochTimes) -> None:
        self.times = times

    def on_train_loader_start(self, context: Any) -> None:
        self.times.start = time.perf_counter()


class _StampEnd(Callback):
    priority = -10**6  # runs before every other on_train_loader_end listener

    def __init__(self, times: EpochTimes) -> None:
        self.times = times

    def on_train_loader_end(self, context: Any) -> None:
        self.times.seconds.append(time.perf_counter() - self.times.start)


class IdleCallback(Callback):
    """Overrides nothing: the handler never dispatches to it."""


class BatchEndNoop(Callback):
    """Listens to one per-batch event and does nothing."""

    def on_train_batch_end(self, context: Any) -> None:
        pass


# ---- the two loops ---------------------------------------------------------------------------------

def hand_loop(sizes: Sequence[int], batches: Batches, epochs: int) -> List[float]:
    """The reference loop; returns seconds per epoch (batch loop + one host sync)."""
    device = torch.device("cpu")
    model = make_mlp(sizes).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    criterion = torch.nn.CrossEntropyLoss()  # the object the trainer builds for loss="CrossEntropyLoss"
    seconds = []
    for _ in range(epochs):
        model.train()
        started = time.perf_counter()
        running = torch.zeros((), device=device)
        for x, y in batches:
            x, y = x.to(device), y.to(device)
            out = model(x)
            loss = criterion(out, y)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            running += loss.detach()
        float(running)
        seconds.append(time.perf_counter() - started)
    return seconds


QUIET = {"sg_logger": "base", "progress_bar": False}


def trainer_loop(sizes: Sequence[int], batches: Batches, epochs: int, extra_params: Dict[str, Any],
                 extra_callbacks: Callable[[], List[Callback]], root: str, name: str) -> List[float]:
    """Trainer.train with ``extra_params``; returns seconds per epoch's train pass."""
    times = EpochTimes()
    params = {
        "max_epochs": epochs,
        "initial_lr": 0.01,
        "optimizer": "SGD",
        "optimizer_params": {"momentum": 0.9},
        "loss": "CrossEntropyLoss",
        "valid_metrics_list": [],
        "metric_to_watch": "CrossEntropyLoss",
        "greater_metric_to_watch_is_better": False,
        **extra_params,
        "phase_callbacks": [_StampStart(times), _StampEnd(times), *extra_callbacks()],
    }
    model = make_mlp(sizes)
    # The progress bar writes to stderr; send it to /dev/null so the table stays readable.
    with open(os.devnull, "w") as devnull, contextlib.redirect_stderr(devnull):
        Trainer(experiment_name=name, ckpt_root_dir=root, device="cpu").train(
            model=model, training_params=params, train_loader=batches, valid_loader=None)
    assert len(times.seconds) == epochs, times.seconds
    return times.seconds


# ---- cases -------------------------------------------------------------------------------------------

@dataclass
class Variant:
    name: str
    params: Dict[str, Any]
    callbacks: Callable[[], List[Callback]] = list
    target: str = ""  # shown in the table
    check: Optional[Callable[[Dict[str, "Result"]], Tuple[float, bool]]] = None


@dataclass
class Group:
    """One model and data set; its hand loop is shared by all its trainer variants."""

    name: str
    sizes: Tuple[int, ...]
    batch_size: int
    steps: int
    epochs: int
    variants: List[Variant]


@dataclass
class Result:
    samples: List[float] = field(default_factory=list)  # s/step of every kept epoch, all rounds

    @property
    def median(self) -> float:
        return statistics.median(self.samples)

    @property
    def iqr_pct(self) -> float:
        """Interquartile range as % of the median: the noise to read a ratio against."""
        if len(self.samples) < 4:
            return float("nan")
        q1, _, q3 = statistics.quantiles(self.samples, n=4)
        return 100.0 * (q3 - q1) / self.median


def _ratio_to_hand(limit: float, group: str, case: str):
    def check(results: Dict[str, Result]) -> Tuple[float, bool]:
        ratio = results[case].median / results[f"{group}/hand"].median
        return ratio, ratio <= limit
    return check


def _added_vs(reference: str, case: str, limit_pct: float):
    def check(results: Dict[str, Result]) -> Tuple[float, bool]:
        added = 100.0 * (results[case].median / results[reference].median - 1.0)
        return added, added < limit_pct
    return check


def build_groups(quick: bool) -> List[Group]:
    tiny_steps, tiny_epochs = (40, 3) if quick else (200, 7)
    big_steps, big_epochs = (3, 3) if quick else (16, 5)
    idle = lambda: [IdleCallback() for _ in range(N_CALLBACKS)]  # noqa: E731
    listening = lambda: [BatchEndNoop() for _ in range(N_CALLBACKS)]  # noqa: E731
    tiny = Group("tiny", (64, 64, 10), 64, tiny_steps, tiny_epochs, [
        Variant("tiny_default", {}, target="ratio <= 1.05",
                check=_ratio_to_hand(1.05, "tiny", "tiny_default")),
        Variant("tiny_quiet", dict(QUIET), target="(reference for the *_cb rows)"),
        Variant(f"tiny_{N_CALLBACKS}_idle_cb", dict(QUIET), idle, target="added vs tiny_quiet < 1%",
                check=_added_vs("tiny_quiet", f"tiny_{N_CALLBACKS}_idle_cb", 1.0)),
        Variant(f"tiny_{N_CALLBACKS}_batch_end_cb", dict(QUIET), listening, target="(informational)"),
    ])
    compute = Group("compute", (1024, 2048, 1024, 10), 256, big_steps, big_epochs, [
        Variant("compute_default", {}, target="ratio <= 1.01",
                check=_ratio_to_hand(1.01, "compute", "compute_default")),
    ])
    return [tiny, compute]


def run_group(group: Group, rounds: int, root: str, results: Dict[str, Result], log: Callable[[str], None]) -> None:
    batches = make_batches(group.sizes[0], group.sizes[-1], group.batch_size, group.steps)
    runners: List[Tuple[str, Callable[[str], List[float]]]] = [
        (f"{group.name}/hand", lambda tag: hand_loop(group.sizes, batches, group.epochs))]
    for v in group.variants:
        runners.append((v.name, lambda tag, v=v: trainer_loop(
            group.sizes, batches, group.epochs, v.params, v.callbacks, root, tag)))
    for key, _ in runners:
        results.setdefault(key, Result())
    # Untimed warm-up of both loops (first-use allocations, lazy imports such as tensorboard).
    hand_loop(group.sizes, batches[:2], 2)
    trainer_loop(group.sizes, batches[:2], 1, {}, list, root, f"{group.name}_warmup")
    for r in range(rounds):
        shift = r % len(runners)
        order = runners[shift:] + runners[:shift]  # rotate so every variant takes every position
        for key, run in order:
            gc.collect()
            seconds = run(f"{key.replace('/', '_')}_r{r}")
            per_step = [s / group.steps for s in seconds[1:]]  # drop the warm-up epoch
            results[key].samples.extend(per_step)
        log(f"  {group.name}: round {r + 1}/{rounds} done")


def dispatch_costs(quick: bool) -> Dict[str, float]:
    """Seconds per ``CallbackHandler.on_train_batch_end`` call (best of 5), the per-event cost that the
    end-to-end timings cannot resolve below their noise."""
    number = 20_000 if quick else 200_000
    handlers = {
        "no callbacks": CallbackHandler([]),
        f"{N_CALLBACKS} idle": CallbackHandler([IdleCallback() for _ in range(N_CALLBACKS)]),
        f"{N_CALLBACKS} no-op listeners": CallbackHandler([BatchEndNoop() for _ in range(N_CALLBACKS)]),
    }
    context = PhaseContext()
    return {name: min(timeit.repeat("h.on_train_batch_end(c)", globals={"h": h, "c": context},
                                    number=number, repeat=5)) / number
            for name, h in handlers.items()}


def _default_ckpt_base() -> Optional[str]:
    shm = "/dev/shm"
    return shm if os.path.isdir(shm) and os.access(shm, os.W_OK) else None


# ---- main ----------------------------------------------------------------------------------------------

def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: few steps, epochs and rounds")
    parser.add_argument("--rounds", type=int, default=None, help="interleaved rounds per model (default 7, quick 2)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads for both loops (default 1)")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON to PATH")
    parser.add_argument("--check", action="store_true", help="exit 1 when a target is missed")
    parser.add_argument("--ckpt-base", metavar="DIR", default=_default_ckpt_base(),
                        help="where the trainer's temporary ckpt_root_dir is made (default: /dev/shm when "
                             "writable, else the system temp dir): the trainer fsyncs a checkpoint every "
                             "epoch, and on a disk the write-back can add noise to the following steps")
    args = parser.parse_args(argv)
    rounds = args.rounds or (2 if args.quick else 7)
    torch.set_num_threads(args.threads)

    def log(text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    groups = build_groups(args.quick)
    results: Dict[str, Result] = {}
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="st_overhead_", dir=args.ckpt_base) as root:
        for group in groups:
            log(f"running {group.name}: MLP {'-'.join(map(str, group.sizes))}, batch {group.batch_size}, "
                f"{group.steps} steps x {group.epochs} epochs, {rounds} rounds")
            run_group(group, rounds, root, results, log)
    dispatch = dispatch_costs(args.quick)
    elapsed = time.perf_counter() - started

    print(f"super_trainer {super_trainer.__version__} overhead benchmark{' (--quick)' if args.quick else ''}")
    print(f"torch {torch.__version__}, torch.get_num_threads()={torch.get_num_threads()}, "
          f"python {platform.python_version()}, {os.cpu_count()} CPUs, {platform.machine()}")
    print(f"  trainer ckpt_root_dir under {args.ckpt_base or tempfile.gettempdir()}")
    for g in groups:
        print(f"  {g.name}: MLP {'-'.join(map(str, g.sizes))}, batch {g.batch_size}, {g.steps} steps/epoch x "
              f"{g.epochs} epochs (first dropped), {rounds} interleaved rounds")
    print("  s/step = median over kept epochs of (train-pass seconds / steps); spread = IQR/median of trainer samples")
    print()
    header = (f"{'case':<22} {'hand s/step':>12} {'trainer s/step':>14} {'ratio':>7} {'spread':>7}  "
              f"{'target':<30} result")
    print(header)
    print("-" * len(header))
    rows = []
    failed = False
    for g in groups:
        hand = results[f"{g.name}/hand"]
        for v in g.variants:
            res = results[v.name]
            ratio = res.median / hand.median
            status, measured = "", None
            if v.check is not None:
                measured, ok = v.check(results)
                status = "PASS" if ok else "FAIL"
                failed |= not ok
            note = ""
            if v.name.startswith(f"tiny_{N_CALLBACKS}_"):
                added = res.median - results["tiny_quiet"].median
                note = f" ({100 * added / results['tiny_quiet'].median:+.2f}% vs tiny_quiet)"
            print(f"{v.name:<22} {hand.median:>12.3e} {res.median:>14.3e} {ratio:>7.3f} {res.iqr_pct:>6.1f}%  "
                  f"{v.target:<30} {status}{note}")
            rows.append({
                "case": v.name, "group": g.name, "model": list(g.sizes), "batch_size": g.batch_size,
                "steps_per_epoch": g.steps, "epochs": g.epochs, "hand_s_per_step": hand.median,
                "trainer_s_per_step": res.median, "ratio": ratio, "target": v.target, "checked_value": measured,
                "passed": None if not status else status == "PASS",
                "hand_samples": hand.samples, "trainer_samples": res.samples,
            })
    listen = dispatch[f"{N_CALLBACKS} no-op listeners"]
    print("\nevent dispatch, CallbackHandler.on_train_batch_end (timeit, best of 5): "
          + ", ".join(f"{name} {1e9 * sec:.0f} ns" for name, sec in dispatch.items())
          + f" (= {1e9 * (listen - dispatch['no callbacks']) / N_CALLBACKS:.0f} ns per listener call)")
    print(f"wall time {elapsed:.0f} s")

    if args.json:
        payload = {
            "torch": torch.__version__, "super_trainer": super_trainer.__version__,
            "python": platform.python_version(), "threads": torch.get_num_threads(), "cpus": os.cpu_count(),
            "quick": args.quick, "rounds": rounds, "ckpt_base": args.ckpt_base or tempfile.gettempdir(),
            "wall_s": elapsed, "cases": rows, "dispatch_s_per_event": dispatch,
        }
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump(payload, fh, indent=2)
        print(f"wrote {args.json}")
    return 1 if (args.check and failed) else 0


if __name__ == "__main__":
    sys.exit(main())
