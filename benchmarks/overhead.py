"""Per-step and whole-fit overhead of ``super_trainer.Trainer.train`` against a hand-written PyTorch loop.

Run from the repository root::

    .venv/bin/python benchmarks/overhead.py            # full run (about 3 minutes on 2 CPU cores)
    .venv/bin/python benchmarks/overhead.py --quick    # smoke run (under a minute, most of it torch.compile)
    .venv/bin/python benchmarks/overhead.py --groups tiny --json results.json

Method (see benchmarks/README.md):

- Data is a plain list of pre-built ``(x, y)`` CPU tensors, the same list object for both loops, so no
  DataLoader collation hides (or adds) cost.
- Only the train pass of each epoch is timed. In the trainer two timing callbacks read the clock (``--clock``:
  wall ``time.perf_counter()`` or the thread's CPU time) at ``on_train_loader_start`` (running after every other
  listener) and ``on_train_loader_end`` (running before every other listener); the hand loop is timed over the same span
  (the batch loop plus the one end-of-epoch host sync). Per-epoch costs outside that span (checkpoint
  writes, logger setup, params YAML) are therefore not counted: this is the per-*step* overhead.
- s/step of an epoch = epoch time / batches. The first epoch of every run is dropped as warm-up; the
  reported value is the median over the remaining epochs of all rounds.
- Whole fit: wall time from building the model to the end of training (``Trainer.train`` returning: logger
  setup, params YAML, every checkpoint write, first epoch included), median over rounds. The hand loop builds the
  same model and optimizer and writes nothing.
- ``tiny_hand_grads_to_none``: the hand loop setting the gradients to None itself instead of calling
  ``opt.zero_grad(set_to_none=True)``, as the trainer does while no profiler records (zero_grad's per-call
  profiler annotation is ~15 us of a tiny step). The trainer's own overhead is its step over this row's.
- Peers: the tiny workload also runs in PyTorch-Ignite (``create_supervised_trainer``) and Lightning
  (``lightning.pytorch.Trainer`` defaults, accelerator cpu) when they are importable; missing ones are skipped
  with a printed line. They are not dependencies of super_trainer.
- Compiled: the compute-bound MLP with ``torch.compile(model)`` in the hand loop and passed to the trainer,
  against eager (the first, compiling run is untimed warm-up).
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

# The clock every loop stamps with: wall time (default) or, with --clock thread, the CPU time of the calling
# thread, which other processes on a shared machine do not inflate (but which leaves out waits, such as fsync).
clock: Callable[[], float] = time.perf_counter


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
        self.net_type = ""  # the class of context.net: shows whether a compiled model stayed compiled


class _StampStart(Callback):
    priority = 10**6  # lower runs first: this runs after every other on_train_loader_start listener

    def __init__(self, times: EpochTimes) -> None:
        self.times = times

    def on_train_loader_start(self, context: Any) -> None:
        self.times.net_type = type(context.net).__name__
        self.times.start = clock()


class _StampEnd(Callback):
    priority = -10**6  # runs before every other on_train_loader_end listener

    def __init__(self, times: EpochTimes) -> None:
        self.times = times

    def on_train_loader_end(self, context: Any) -> None:
        self.times.seconds.append(clock() - self.times.start)


class IdleCallback(Callback):
    """Overrides nothing: the handler never dispatches to it."""


class BatchEndNoop(Callback):
    """Listens to one per-batch event and does nothing."""

    def on_train_batch_end(self, context: Any) -> None:
        pass


# ---- the loops: each returns (seconds of each epoch's train pass, seconds of the whole fit) ------------

Timings = Tuple[List[float], float]


def hand_loop(sizes: Sequence[int], batches: Batches, epochs: int, compile: bool = False,
              grads_to_none: bool = False) -> Timings:
    """The reference loop: batch loop + one host sync per epoch. ``grads_to_none``: set the gradients to None
    directly instead of ``opt.zero_grad(set_to_none=True)`` (what the trainer does while no profiler records;
    zero_grad's per-call profiler annotation is most of its cost)."""
    fit_start = clock()
    device = torch.device("cpu")
    model = make_mlp(sizes).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    forward = torch.compile(model) if compile else model
    criterion = torch.nn.CrossEntropyLoss()  # the object the trainer builds for loss="CrossEntropyLoss"
    params = [p for group in opt.param_groups for p in group["params"]]
    seconds = []
    for _ in range(epochs):
        model.train()
        started = clock()
        running = torch.zeros((), device=device)
        for x, y in batches:
            x, y = x.to(device), y.to(device)
            out = forward(x)
            loss = criterion(out, y)
            loss.backward()
            opt.step()
            if grads_to_none:
                for p in params:
                    p.grad = None
            else:
                opt.zero_grad(set_to_none=True)
            running += loss.detach()
        float(running)
        seconds.append(clock() - started)
    return seconds, clock() - fit_start


QUIET = {"sg_logger": "base", "progress_bar": False}


def trainer_loop(sizes: Sequence[int], batches: Batches, epochs: int, extra_params: Dict[str, Any],
                 extra_callbacks: Callable[[], List[Callback]], root: str, name: str, compile: bool = False,
                 net_types: Optional[List[str]] = None) -> Timings:
    """Trainer.train with ``extra_params`` (and ``torch.compile(model)`` passed in when ``compile``)."""
    fit_start = clock()
    times = EpochTimes()
    params = {
        "max_epochs": epochs,
        "initial_lr": 0.01,
        "optimizer": "SGD",
        # weight_decay 0 explicitly: the trainer's SG-compatible SGD default is 1e-4, the hand loop has none
        "optimizer_params": {"momentum": 0.9, "weight_decay": 0.0},
        "loss": "CrossEntropyLoss",
        "valid_metrics_list": [],
        "metric_to_watch": "CrossEntropyLoss",
        "greater_metric_to_watch_is_better": False,
        **extra_params,
        "phase_callbacks": [_StampStart(times), _StampEnd(times), *extra_callbacks()],
    }
    model = make_mlp(sizes)
    if compile:
        model = torch.compile(model)
    # The progress bar (stderr) and the epoch lines (stdout) go to /dev/null so the table stays readable.
    with open(os.devnull, "w") as devnull, contextlib.redirect_stderr(devnull), contextlib.redirect_stdout(devnull):
        Trainer(experiment_name=name, ckpt_root_dir=root, device="cpu").train(
            model=model, training_params=params, train_loader=batches, valid_loader=None)
    fit = clock() - fit_start
    assert len(times.seconds) == epochs, times.seconds
    if net_types is not None:
        net_types.append(times.net_type)
    return times.seconds, fit


@contextlib.contextmanager
def _silenced():
    """Peers print banners, summaries and warnings; none of it may reach the table."""
    import logging
    import warnings

    with open(os.devnull, "w") as devnull, contextlib.redirect_stdout(devnull), \
            contextlib.redirect_stderr(devnull), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        level = logging.root.manager.disable
        logging.disable(logging.WARNING)
        try:
            yield
        finally:
            logging.disable(level)


def peer_available(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def ignite_loop(sizes: Sequence[int], batches: Batches, epochs: int, root: str, name: str) -> Timings:
    """PyTorch-Ignite's ``create_supervised_trainer`` (its default update: zero_grad, forward, loss, backward,
    step, ``loss.item()``), timed from EPOCH_STARTED to EPOCH_COMPLETED by the first handlers attached."""
    from ignite.engine import Events, create_supervised_trainer

    fit_start = clock()
    times = EpochTimes()
    model = make_mlp(sizes)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    engine = create_supervised_trainer(model, opt, torch.nn.CrossEntropyLoss(), device="cpu")
    engine.add_event_handler(Events.EPOCH_STARTED, lambda _: setattr(times, "start", clock()))
    engine.add_event_handler(Events.EPOCH_COMPLETED,
                             lambda _: times.seconds.append(clock() - times.start))
    with _silenced():
        engine.run(batches, max_epochs=epochs)
    return times.seconds, clock() - fit_start


class _OneLoader:
    """The batch list as one iterable: Lightning reads a plain list as a sequence of loaders."""

    def __init__(self, batches: Batches) -> None:
        self.batches = batches

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Any:
        return iter(self.batches)


def lightning_loop(sizes: Sequence[int], batches: Batches, epochs: int, root: str, name: str) -> Timings:
    """Lightning's Trainer with its defaults (progress bar, logger, ModelCheckpoint, model summary) on CPU,
    timed from on_train_epoch_start to on_train_epoch_end by a callback."""
    import lightning.pytorch as pl

    fit_start = clock()
    times = EpochTimes()

    class Module(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = make_mlp(sizes)
            self.criterion = torch.nn.CrossEntropyLoss()

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            x, y = batch
            return self.criterion(self.net(x), y)

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.01, momentum=0.9)

    class Stamp(pl.Callback):
        def on_train_epoch_start(self, trainer: Any, module: Any) -> None:
            times.start = clock()

        def on_train_epoch_end(self, trainer: Any, module: Any) -> None:
            times.seconds.append(clock() - times.start)

    with _silenced():
        trainer = pl.Trainer(max_epochs=epochs, accelerator="cpu", devices=1, callbacks=[Stamp()],
                             default_root_dir=os.path.join(root, name))
        trainer.fit(Module(), train_dataloaders=_OneLoader(batches))
    return times.seconds, clock() - fit_start


# ---- cases -------------------------------------------------------------------------------------------

Runner = Callable[[Sequence[int], Batches, int, str, str], Timings]  # (sizes, batches, epochs, root, name)


@dataclass
class Variant:
    name: str
    params: Dict[str, Any] = field(default_factory=dict)
    callbacks: Callable[[], List[Callback]] = list
    target: str = ""  # shown in the table
    check: Optional[Callable[[Dict[str, "Result"]], Tuple[float, bool]]] = None
    fit_check: Optional[Callable[[Dict[str, "Result"]], Tuple[float, bool]]] = None
    runner: Optional[Runner] = None  # None: Trainer.train with params and callbacks
    compile: bool = False  # the trainer gets torch.compile(model)


@dataclass
class Group:
    """One model and data set; its hand loop is shared by all its variants."""

    name: str
    sizes: Tuple[int, ...]
    batch_size: int
    steps: int
    epochs: int
    variants: List[Variant]
    compile_warmup: bool = False  # compile once, untimed, before the rounds


@dataclass
class Result:
    samples: List[float] = field(default_factory=list)  # s/step of every kept epoch, all rounds
    fits: List[float] = field(default_factory=list)  # whole-fit seconds, one per round
    net_types: List[str] = field(default_factory=list)  # class of context.net seen by the trainer

    @property
    def median(self) -> float:
        return statistics.median(self.samples)

    @property
    def fit(self) -> float:
        return statistics.median(self.fits)

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


def _fit_ratio_to_hand(limit: float, group: str, case: str):
    def check(results: Dict[str, Result]) -> Tuple[float, bool]:
        ratio = results[case].fit / results[f"{group}/hand"].fit
        return ratio, ratio <= limit
    return check


def _compiled_faster_than(reference: str, case: str):
    """Faster than ``reference``, and trained compiled: a trainer that unwrapped the compiled module fails."""
    def check(results: Dict[str, Result]) -> Tuple[float, bool]:
        ratio = results[case].median / results[reference].median
        kept_compiled = set(results[case].net_types) == {"OptimizedModule"}
        return ratio, ratio < 1.0 and kept_compiled
    return check


def _added_vs(reference: str, case: str, limit_pct: float):
    def check(results: Dict[str, Result]) -> Tuple[float, bool]:
        added = 100.0 * (results[case].median / results[reference].median - 1.0)
        return added, added < limit_pct
    return check


GROUPS = ("tiny", "short", "compute", "compiled")


def build_groups(quick: bool, names: Sequence[str], log: Callable[[str], None]) -> List[Group]:
    tiny_steps, tiny_epochs = (40, 3) if quick else (200, 7)
    big_steps, big_epochs = (3, 3) if quick else (16, 5)
    compiled_steps, compiled_epochs = (3, 3) if quick else (8, 4)
    idle = lambda: [IdleCallback() for _ in range(N_CALLBACKS)]  # noqa: E731
    listening = lambda: [BatchEndNoop() for _ in range(N_CALLBACKS)]  # noqa: E731
    peers = []
    for module, label, runner in (("ignite", "ignite", ignite_loop), ("lightning", "lightning", lightning_loop)):
        if peer_available(module):
            peers.append(Variant(f"tiny_{label}", target="(peer, informational)", runner=runner))
        elif "tiny" in names:
            log(f"peer {label}: not installed, skipped (pip install "
                f"{'pytorch-ignite' if module == 'ignite' else 'lightning'} to include it)")
    tiny = Group("tiny", (64, 64, 10), 64, tiny_steps, tiny_epochs, [
        Variant("tiny_default", target="step <= 1.10, fit <= 1.20",
                check=_ratio_to_hand(1.10, "tiny", "tiny_default"),
                fit_check=_fit_ratio_to_hand(1.20, "tiny", "tiny_default")),
        Variant("tiny_quiet", dict(QUIET), target="(reference for the *_cb rows)"),
        Variant(f"tiny_{N_CALLBACKS}_idle_cb", dict(QUIET), idle, target="added vs tiny_quiet < 2%",
                check=_added_vs("tiny_quiet", f"tiny_{N_CALLBACKS}_idle_cb", 2.0)),
        Variant(f"tiny_{N_CALLBACKS}_batch_end_cb", dict(QUIET), listening, target="(informational)"),
        Variant("tiny_hand_grads_to_none", target="(hand loop without zero_grad)", runner=lambda sizes, batches,
                epochs, root, name: hand_loop(sizes, batches, epochs, grads_to_none=True)),
        *peers,
    ])
    # One short epoch: the fixed per-run work (setup, files, the last checkpoint) weighs most here.
    short = Group("short", (64, 64, 10), 64, 128, 1, [
        Variant("short_default", target="fit <= 1.20", fit_check=_fit_ratio_to_hand(1.20, "short", "short_default")),
    ])
    compute = Group("compute", (1024, 2048, 1024, 10), 256, big_steps, big_epochs, [
        Variant("compute_default", target="step <= 1.01",
                check=_ratio_to_hand(1.01, "compute", "compute_default")),
    ])
    hand_compiled: Runner = lambda sizes, batches, epochs, root, name: hand_loop(  # noqa: E731
        sizes, batches, epochs, compile=True)
    compiled = Group("compiled", (1024, 2048, 1024, 10), 256, compiled_steps, compiled_epochs, [
        Variant("compiled_hand", target="(hand loop, torch.compile)", runner=hand_compiled),
        Variant("compiled_trainer_eager", target="(trainer, eager)"),
        Variant("compiled_trainer", target="step < trainer_eager, compiled", compile=True,
                check=_compiled_faster_than("compiled_trainer_eager", "compiled_trainer")),
    ], compile_warmup=True)
    return [g for g in (tiny, short, compute, compiled) if g.name in names]


def run_group(group: Group, rounds: int, root: str, results: Dict[str, Result], log: Callable[[str], None]) -> None:
    batches = make_batches(group.sizes[0], group.sizes[-1], group.batch_size, group.steps)
    runners: List[Tuple[str, Callable[[str], Timings]]] = [
        (f"{group.name}/hand", lambda tag: hand_loop(group.sizes, batches, group.epochs))]
    for v in group.variants:
        if v.runner is not None:
            runners.append((v.name, lambda tag, v=v: v.runner(group.sizes, batches, group.epochs, root, tag)))
        else:
            runners.append((v.name, lambda tag, v=v: trainer_loop(
                group.sizes, batches, group.epochs, v.params, v.callbacks, root, tag, compile=v.compile,
                net_types=results[v.name].net_types)))
    for key, _ in runners:
        results.setdefault(key, Result())
    # Untimed warm-up of every loop (first-use allocations, lazy imports such as tensorboard, compilation).
    hand_loop(group.sizes, batches[:2], 2)
    trainer_loop(group.sizes, batches[:2], 1, {}, list, root, f"{group.name}_warmup")
    if group.compile_warmup:
        started = time.perf_counter()
        hand_loop(group.sizes, batches[:2], 1, compile=True)
        log(f"  {group.name}: torch.compile warm-up {time.perf_counter() - started:.1f} s")
    for v in group.variants:
        if v.runner is not None:
            v.runner(group.sizes, batches[:2], 1, root, f"{v.name}_warmup")
    for r in range(rounds):
        shift = r % len(runners)
        order = runners[shift:] + runners[:shift]  # rotate so every variant takes every position
        for key, run in order:
            gc.collect()
            seconds, fit = run(f"{key.replace('/', '_')}_r{r}")
            kept = seconds[1:] or seconds  # drop the warm-up epoch (a one-epoch group keeps it)
            per_step = [s / group.steps for s in kept]
            results[key].samples.extend(per_step)
            results[key].fits.append(fit)
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
    parser.add_argument("--groups", default=",".join(GROUPS),
                        help=f"comma-separated groups to run, of {', '.join(GROUPS)} (default: all)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads for both loops (default 1)")
    parser.add_argument("--clock", choices=["wall", "thread"], default="wall",
                        help="wall: time.perf_counter (default); thread: time.thread_time, the training thread's "
                             "CPU time, steadier on a loaded machine but blind to waits (fsync, sleeping)")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON to PATH")
    parser.add_argument("--check", action="store_true", help="exit 1 when a target is missed")
    parser.add_argument("--ckpt-base", metavar="DIR", default=_default_ckpt_base(),
                        help="where the trainer's temporary ckpt_root_dir is made (default: /dev/shm when "
                             "writable, else the system temp dir): the trainer fsyncs a checkpoint every "
                             "epoch, and on a disk the write-back can add noise to the following steps")
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.groups.split(",") if n.strip()]
    unknown = sorted(set(names) - set(GROUPS))
    if unknown:
        parser.error(f"--groups: unknown {unknown}; valid: {', '.join(GROUPS)}")
    rounds = args.rounds or (2 if args.quick else 7)
    torch.set_num_threads(args.threads)
    global clock
    clock = time.thread_time if args.clock == "thread" else time.perf_counter

    def log(text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    groups = build_groups(args.quick, names, log)
    results: Dict[str, Result] = {}
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="st_overhead_", dir=args.ckpt_base) as root:
        for group in groups:
            group_rounds = min(rounds, 3) if group.name == "compiled" else rounds
            log(f"running {group.name}: MLP {'-'.join(map(str, group.sizes))}, batch {group.batch_size}, "
                f"{group.steps} steps x {group.epochs} epochs, {group_rounds} rounds")
            run_group(group, group_rounds, root, results, log)
    dispatch = dispatch_costs(args.quick)
    elapsed = time.perf_counter() - started

    print(f"super_trainer {super_trainer.__version__} overhead benchmark{' (--quick)' if args.quick else ''}")
    print(f"torch {torch.__version__}, torch.get_num_threads()={torch.get_num_threads()}, "
          f"python {platform.python_version()}, {os.cpu_count()} CPUs, {platform.machine()}")
    print(f"  trainer ckpt_root_dir under {args.ckpt_base or tempfile.gettempdir()}; clock: "
          f"{'time.thread_time (training thread CPU time)' if args.clock == 'thread' else 'time.perf_counter (wall)'}; "
          f"load average {' '.join(f'{x:.1f}' for x in os.getloadavg())}")
    for g in groups:
        print(f"  {g.name}: MLP {'-'.join(map(str, g.sizes))}, batch {g.batch_size}, {g.steps} steps/epoch x "
              f"{g.epochs} epochs (first dropped), {len(results[g.name + '/hand'].fits)} interleaved rounds")
    print("  s/step = median over kept epochs of (train-pass seconds / steps); spread = IQR/median of the case's "
          "samples;\n  fit = median whole-run seconds (model built to training returned, all epochs, checkpoints)")
    print()
    header = (f"{'case':<24} {'hand s/step':>11} {'case s/step':>11} {'ratio':>6} {'spread':>6}  "
              f"{'hand fit':>8} {'case fit':>8} {'ratio':>6}  {'target':<27} result")
    print(header)
    print("-" * len(header))
    rows = []
    failed = False
    for g in groups:
        hand = results[f"{g.name}/hand"]
        for v in g.variants:
            res = results[v.name]
            ratio, fit_ratio = res.median / hand.median, res.fit / hand.fit
            outcomes, measured = [], {}
            for label, check in (("step", v.check), ("fit", v.fit_check)):
                if check is not None:
                    measured[label], ok = check(results)
                    outcomes.append("PASS" if ok else f"FAIL({label})")
                    failed |= not ok
            failures = [o for o in outcomes if o != "PASS"]
            status = " ".join(failures) if failures else ("PASS" if outcomes else "")
            note = ""
            if v.name.startswith(f"tiny_{N_CALLBACKS}_"):
                added = res.median - results["tiny_quiet"].median
                note = f" ({100 * added / results['tiny_quiet'].median:+.2f}% vs tiny_quiet)"
            if v.compile and res.net_types:
                note = f" (context.net: {', '.join(sorted(set(res.net_types)))})"
            print(f"{v.name:<24} {hand.median:>11.3e} {res.median:>11.3e} {ratio:>6.3f} {res.iqr_pct:>5.1f}%  "
                  f"{hand.fit:>7.3f}s {res.fit:>7.3f}s {fit_ratio:>6.3f}  {v.target:<27} {status}{note}")
            rows.append({
                "case": v.name, "group": g.name, "model": list(g.sizes), "batch_size": g.batch_size,
                "steps_per_epoch": g.steps, "epochs": g.epochs, "hand_s_per_step": hand.median,
                "case_s_per_step": res.median, "ratio": ratio, "hand_fit_s": hand.fit, "case_fit_s": res.fit,
                "fit_ratio": fit_ratio, "target": v.target, "checked_values": measured,
                "passed": None if not outcomes else all(o == "PASS" for o in outcomes),
                "net_types": sorted(set(res.net_types)),
                "hand_samples": hand.samples, "case_samples": res.samples, "hand_fits": hand.fits,
                "case_fits": res.fits,
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
            "quick": args.quick, "rounds": rounds, "clock": args.clock, "loadavg": os.getloadavg(),
            "ckpt_base": args.ckpt_base or tempfile.gettempdir(),
            "wall_s": elapsed, "cases": rows, "dispatch_s_per_event": dispatch,
        }
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump(payload, fh, indent=2)
        print(f"wrote {args.json}")
    return 1 if (args.check and failed) else 0


if __name__ == "__main__":
    sys.exit(main())
