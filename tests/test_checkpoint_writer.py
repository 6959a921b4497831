"""CheckpointWriter: background checkpoint writes that copy first, stay atomic and surface their errors."""
from __future__ import annotations

import collections
import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import PYTHON, Recorder, make_loader, make_model, only_run, python_env, quiet_params
from super_trainer import Callback, Trainer
from super_trainer import checkpoint as ckpt
from super_trainer import checkpoint_writer
from super_trainer.checkpoint import CheckpointWriter, copy_to_host, read_checkpoint
from super_trainer.checkpoint_writer import WRITER_THREAD_NAME
from super_trainer.loop.stops import Terminated


@pytest.fixture(autouse=True)
def serialize_in_the_background(monkeypatch):
    """These tests hold or fail ``torch.save`` on the writer's thread: every state, however small, is serialized
    there (by default states under SERIALIZE_HERE_BYTES are serialized by ``save``; tested at the end)."""
    monkeypatch.setattr(checkpoint_writer, "SERIALIZE_HERE_BYTES", 0)


class HeldWrites:
    """Makes every background write wait until ``release()``, so a test can act while a write is in flight.
    Counts torch.save calls."""

    def __init__(self, monkeypatch):
        self.gate = threading.Event()
        self.started = threading.Event()
        self.saves = 0
        real_save = torch.save

        def held_save(obj, f, *args, **kwargs):
            self.started.set()
            assert self.gate.wait(10), "test never released the write"
            self.saves += 1
            return real_save(obj, f, *args, **kwargs)

        monkeypatch.setattr(torch, "save", held_save)

    def release(self):
        self.gate.set()


def test_state_changed_right_after_save_is_not_what_is_written(tmp_path, monkeypatch):
    held = HeldWrites(monkeypatch)
    weights = torch.zeros(4)
    history = [{"epoch": 0}]
    writer = CheckpointWriter()
    writer.save({"net": {"w": weights}, "history": history}, tmp_path / "c.pth")
    assert held.started.wait(10)  # the write is in flight, still holding
    weights.add_(1.0)  # training goes on: in-place updates, appended history
    history.append({"epoch": 1})
    history[0]["epoch"] = 99
    held.release()
    writer.close()
    state = torch.load(tmp_path / "c.pth", weights_only=True)
    assert torch.equal(state["net"]["w"], torch.zeros(4))
    assert state["history"] == [{"epoch": 0}]


def test_several_paths_serialize_once_and_hold_the_same_bytes(tmp_path, monkeypatch):
    held = HeldWrites(monkeypatch)
    held.release()
    paths = [tmp_path / "ckpt_latest.pth", tmp_path / "ckpt_epoch_3.pth", tmp_path / "sub" / "ckpt_best.pth"]
    with CheckpointWriter(make_dirs=True) as writer:  # "sub" does not exist yet
        writer.save({"net": {"w": torch.arange(5.0)}, "epoch": 3}, *paths)
    assert held.saves == 1
    assert paths[0].read_bytes() == paths[1].read_bytes() == paths[2].read_bytes()
    assert torch.load(paths[2], weights_only=True)["epoch"] == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt_epoch_3.pth", "ckpt_latest.pth", "sub"]


def test_reader_sees_the_previous_complete_file_until_the_write_lands(tmp_path, monkeypatch):
    path = tmp_path / "c.pth"
    writer = CheckpointWriter()
    writer.save({"v": torch.ones(3)}, path)
    writer.flush()
    held = HeldWrites(monkeypatch)
    writer.save({"v": torch.full((3,), 2.0)}, path)
    assert held.started.wait(10) and writer.busy
    assert torch.equal(torch.load(path, weights_only=True)["v"], torch.ones(3))
    held.release()
    writer.flush()
    assert not writer.busy
    assert torch.equal(torch.load(path, weights_only=True)["v"], torch.full((3,), 2.0))


def test_at_most_one_write_in_flight(tmp_path, monkeypatch):
    held = HeldWrites(monkeypatch)
    writer = CheckpointWriter()
    writer.save({"v": torch.zeros(1)}, tmp_path / "a.pth")
    assert held.started.wait(10)
    second = threading.Thread(target=writer.save, args=({"v": torch.ones(1)}, tmp_path / "b.pth"))
    second.start()
    second.join(0.3)
    assert second.is_alive()  # the second save waits for the first write
    assert not (tmp_path / "a.pth").exists() and not (tmp_path / "b.pth").exists()
    held.release()
    second.join(10)
    writer.close()
    assert held.saves == 2 and (tmp_path / "a.pth").is_file() and (tmp_path / "b.pth").is_file()


def _failing_save(obj, f, *args, **kwargs):
    f.write(b"partial bytes")
    raise OSError("disk full")


def test_failed_write_keeps_the_old_file_and_raises_at_the_next_save(tmp_path, monkeypatch):
    path = tmp_path / "c.pth"
    writer = CheckpointWriter()
    writer.save({"v": torch.ones(3)}, path)
    writer.flush()
    monkeypatch.setattr(torch, "save", _failing_save)
    writer.save({"v": torch.zeros(3)}, path)  # fails in the background
    deadline = time.monotonic() + 30
    while writer.busy and time.monotonic() < deadline:  # wait without flush(), which would raise
        time.sleep(0.01)
    monkeypatch.undo()
    with pytest.raises(OSError, match="disk full") as info:
        writer.save({"v": torch.full((3,), 5.0)}, path)
    assert str(path) in "\n".join(getattr(info.value, "__notes__", [str(path)]))
    writer.close()  # the error was raised once, not again
    assert torch.equal(torch.load(path, weights_only=True)["v"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == ["c.pth"]  # no temp file left


def test_failed_write_raises_at_close(tmp_path, monkeypatch):
    monkeypatch.setattr(torch, "save", _failing_save)
    writer = CheckpointWriter()
    writer.save({"v": torch.ones(3)}, tmp_path / "c.pth")
    with pytest.raises(OSError, match="disk full"):
        writer.close()
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(RuntimeError, match="after close"):
        writer.save({"v": torch.ones(3)}, tmp_path / "c.pth")


def test_copy_to_host_keeps_structure_and_shares_nothing():
    Pair = collections.namedtuple("Pair", "a b")
    net = torch.nn.Linear(2, 2).state_dict()
    shared = torch.ones(2)
    state = {"net": net, "pair": Pair(shared, 3), "same": [shared, shared], "size": torch.Size([2, 3]),
             "np": np.arange(3), "rng": (1, (2, 3), None), "opt": {0: {"momentum_buffer": torch.zeros(2)}}}
    host = copy_to_host(state)
    assert type(host["net"]) is collections.OrderedDict and host["net"]._metadata == net._metadata
    assert isinstance(host["pair"], Pair) and host["pair"].b == 3 and host["size"] == torch.Size([2, 3])
    assert host["same"][0] is host["same"][1] is host["pair"].a  # copied once, stored once
    assert host["rng"] == (1, (2, 3), None) and list(host["opt"]) == [0]
    shared.add_(1)
    net["weight"].add_(1)
    state["np"][0] = 7
    assert torch.equal(host["pair"].a, torch.ones(2)) and host["np"][0] == 0
    assert not torch.equal(host["net"]["weight"], net["weight"])


def test_unflushed_write_completes_when_the_interpreter_exits(tmp_path):
    path = tmp_path / "c.pth"
    script = (
        "import time, torch\n"
        "from super_trainer.checkpoint import CheckpointWriter\n"
        "real = torch.save\n"
        "def slow(*a, **k):\n"
        "    time.sleep(0.5)\n"
        "    return real(*a, **k)\n"
        "torch.save = slow\n"
        f"CheckpointWriter().save({{'v': torch.arange(1000)}}, {str(path)!r})\n"
        "raise SystemExit(3)\n"  # leaves at once, the write still in flight
    )
    proc = subprocess.run([PYTHON, "-c", script], env=python_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 3, proc.stderr
    assert torch.equal(torch.load(path, weights_only=True)["v"], torch.arange(1000))


# ---- in the trainer --------------------------------------------------------------------------------------

def test_on_training_end_reads_the_finished_checkpoints(tmp_path):
    seen = []

    class ReadAtEnd(Callback):
        def on_training_end(self, context):
            latest = read_checkpoint(context.ckpt_dir / "ckpt_latest.pth")
            seen.append((latest["epoch"], torch.equal(latest["net"]["0.weight"], context.net.state_dict()["0.weight"])))

    class CtrlC(Callback):
        def on_train_loader_start(self, context):
            if context.epoch == 2:
                raise KeyboardInterrupt

    model = make_model()
    result = Trainer("w", tmp_path).train(model=model, training_params=quiet_params(
        max_epochs=4, ema=True, save_ckpt_epoch_list=[1, 2], phase_callbacks=[ReadAtEnd(), CtrlC()]),
        train_loader=make_loader(), valid_loader=make_loader(16))
    assert result.stop_reason == "interrupted"
    assert seen == [(2, True)]
    run = Path(result.ckpt_dir)
    best = read_checkpoint(run / "ckpt_best.pth")
    for key, value in best["ema_net"].items():  # best holds the EMA weights as its net
        assert torch.equal(best["net"][key], value)
    assert read_checkpoint(run / "ckpt_epoch_1.pth")["epoch"] == 1
    assert read_checkpoint(run / "ckpt_epoch_2.pth")["epoch"] == 2


@pytest.mark.parametrize("fail_at", [1, 2], ids=["raised_at_the_next_batch", "raised_at_the_end"])
def test_a_failed_write_fails_the_run_after_on_training_end(tmp_path, monkeypatch, fail_at):
    from super_trainer.checkpoint import wait_for_writes

    real_save = torch.save
    calls = []

    def save(obj, f, *args, **kwargs):
        calls.append(1)
        if len(calls) == fail_at:  # call 1: epoch 0's ckpt_latest; call 2: the last epoch's
            raise OSError("disk full")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)
    reasons = []

    class End(Callback):
        def on_train_batch_start(self, context):
            if context.epoch == 1 and context.batch_idx == 1:
                wait_for_writes()  # epoch 0's write has failed by now (without raising here)

        def on_training_end(self, context):
            reasons.append((context.stop_reason, type(context.exception).__name__))

    recorder = Recorder()
    with pytest.raises(OSError, match="disk full"):
        Trainer("f", tmp_path).train(model=make_model(), training_params=quiet_params(
            max_epochs=2, valid_metrics_list=[], metric_to_watch="CrossEntropyLoss",
            greater_metric_to_watch_is_better=False, phase_callbacks=[End(), recorder]),
            train_loader=make_loader(), valid_loader=None)
    assert reasons == [("exception", "OSError")]
    assert recorder.events.count("on_training_end") == 1
    epoch_1 = [e for e, epoch, *_ in recorder.detail if epoch == 1 and e == "on_train_batch_end"]
    if fail_at == 1:  # raised on the training thread at the end of the batch that saw it, not an epoch late
        assert 1 <= len(epoch_1) <= 2 and recorder.events.count("on_train_loader_end") == 1
    else:  # the last epoch's write: raised at the end, after both epochs ran
        assert len(epoch_1) == 8 and recorder.events.count("on_train_loader_end") == 2
    assert not [p for p in only_run(tmp_path / "f").iterdir() if p.name.endswith(".tmp")]


def test_a_vanished_run_dir_fails_the_run_at_the_next_batch(tmp_path):
    """The writer never recreates a deleted run dir: the failed write is raised at the next batch."""
    import shutil

    from super_trainer.checkpoint import wait_for_writes

    seen, deleted = [], []

    class DeleteDir(Callback):
        def on_epoch_end(self, context):
            if context.epoch == 0:
                deleted.append(context.ckpt_dir)
                shutil.rmtree(context.ckpt_dir)  # e.g. a cleanup job; the epoch's checkpoint is written next

        def on_train_batch_start(self, context):
            if context.epoch == 1 and context.batch_idx == 1:
                wait_for_writes()

        def on_train_batch_end(self, context):
            seen.append((context.epoch, context.batch_idx))

    with pytest.raises(FileNotFoundError, match="was it deleted during the run"):
        Trainer("v", tmp_path).train(model=make_model(), training_params=quiet_params(
            max_epochs=3, phase_callbacks=[DeleteDir()]), train_loader=make_loader(), valid_loader=make_loader(16))
    assert seen[-1][0] == 1 and seen[-1][1] <= 1  # epoch 1's first batches, not the epoch's end
    assert deleted and not deleted[0].exists()  # the run dir was not recreated


def test_cpu_tensors_are_copied_into_fresh_memory_at_every_save(tmp_path):
    """No pool of ordinary host buffers is kept between saves (see the next test for why); each file holds the
    values of its own save."""
    weights = torch.zeros(1000)
    writer = CheckpointWriter()
    for value in range(3):
        weights.fill_(value)
        writer.save({"net": {"w": weights}, "copy": [weights]}, tmp_path / f"{value}.pth")
        assert writer._buffers == []
    writer.close()
    for value in range(3):
        state = torch.load(tmp_path / f"{value}.pth", weights_only=True)
        assert torch.equal(state["net"]["w"], torch.full((1000,), float(value))) and state["copy"][0] is not None


_PAGE_FAULTS_SCRIPT = """
import resource, statistics, sys
import torch
from conftest import quiet_params
from super_trainer import Callback, Trainer

def mlp():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(1024, 2048), torch.nn.ReLU(), torch.nn.Linear(2048, 1024),
                               torch.nn.ReLU(), torch.nn.Linear(1024, 10))

torch.set_num_threads(1)
batches = [(torch.randn(64, 1024), torch.randint(0, 10, (64,))) for _ in range(16)]
warm = mlp()
optimizer = torch.optim.SGD(warm.parameters(), lr=0.01, momentum=0.9)
for _ in range(4):
    for inputs, target in batches:
        torch.nn.functional.cross_entropy(warm(inputs), target).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
del warm, optimizer
faults = []

class CountFaults(Callback):
    def on_train_batch_start(self, context):
        self.before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt

    def on_train_batch_end(self, context):
        if context.epoch >= 2:  # two checkpoints were written
            faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - self.before)

model = mlp()
Trainer("faults", sys.argv[1]).train(model=model, training_params=quiet_params(
    max_epochs=4, initial_lr=0.01, valid_metrics_list=[], metric_to_watch="CrossEntropyLoss",
    greater_metric_to_watch_is_better=False, optimizer_params={"momentum": 0.9, "weight_decay": 0.0},
    phase_callbacks=[CountFaults()]), train_loader=batches)
print("FAULTS", statistics.median(faults), sum(p.numel() for p in model.parameters()) * 4 // 4096, faults)
"""


def test_checkpoints_leave_later_cpu_steps_free_of_page_faults(tmp_path):
    """Host buffers kept from one checkpoint to the next made glibc hand the gradients' memory back to the OS
    after every step, so each later step page-faulted it afresh (~4000 faults and +11 % per step of this 4M-parameter
    MLP). In a fresh process, after a hand-written warm-up loop: a process's first loop of a model this size may
    fault at every step whatever the trainer does (glibc's thresholds adapt to the first large frees), and what
    earlier tests allocated would make the count depend on their order."""
    proc = subprocess.run([PYTHON, "-c", _PAGE_FAULTS_SCRIPT, str(tmp_path)], env=python_env(), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(line for line in proc.stdout.splitlines() if line.startswith("FAULTS"))
    _, median, gradient_pages, per_step = line.split(" ", 3)
    assert float(median) < int(gradient_pages) // 10, per_step  # ~4100 pages of gradients


def test_remove_happens_only_after_the_writes_succeeded(tmp_path, monkeypatch):
    old = tmp_path / "ckpt_epoch_1.pth"
    writer = CheckpointWriter()
    writer.save({"v": torch.ones(1)}, old)
    writer.flush()
    monkeypatch.setattr(torch, "save", _failing_save)
    writer.save_many([({"v": torch.zeros(1)}, [tmp_path / "ckpt_epoch_2.pth"])], remove=[old])
    with pytest.raises(OSError, match="disk full"):
        writer.flush()
    monkeypatch.undo()
    assert old.is_file()  # the failed write removed nothing
    writer.save_many([({"v": torch.zeros(1)}, [tmp_path / "ckpt_epoch_2.pth"])], remove=[old, tmp_path / "gone.pth"])
    writer.close()
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt_epoch_2.pth"]
    with pytest.raises(ValueError, match="both written and removed"):
        CheckpointWriter().save_many([({"v": torch.ones(1)}, [old])], remove=[old])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_tensors_are_copied_through_pinned_memory(tmp_path):
    weights = torch.zeros(1 << 20, device="cuda")
    writer = CheckpointWriter()
    for value in range(2):
        writer.save({"net": {"w": weights}}, tmp_path / f"{value}.pth")
        weights.add_(1.0)  # queued on the device right after save() returned
    assert writer._buffers[0].is_pinned()
    writer.close()
    for value in range(2):
        state = torch.load(tmp_path / f"{value}.pth", weights_only=True)
        assert state["net"]["w"].device.type == "cpu" and bool((state["net"]["w"] == value).all())


def _one_epoch_run(tmp_path, name):
    """A one-epoch ``train()`` to call, and the stop reasons its on_training_end sees."""
    reasons = []

    class End(Callback):
        def on_training_end(self, context):
            reasons.append(context.stop_reason)

    def train():
        return Trainer(name, tmp_path).train(model=make_model(), training_params=quiet_params(
            max_epochs=1, phase_callbacks=[End()]), train_loader=make_loader(), valid_loader=make_loader(16))

    return train, reasons


def _expect_end(train, raised, reason):
    """``train()`` returns with ``reason`` as its stop reason, or (``raised`` given) raises exactly ``raised``."""
    if raised is None:
        assert train().stop_reason == reason
        return
    with pytest.raises(KeyboardInterrupt) as info:
        train()
    assert type(info.value) is raised


@pytest.mark.parametrize("signals,raised,reason", [
    ((signal.SIGINT,), None, "interrupted"),
    ((signal.SIGTERM,), None, "terminated"),
    ((signal.SIGINT, signal.SIGINT), KeyboardInterrupt, "interrupted"),
    ((signal.SIGTERM, signal.SIGINT), Terminated, "terminated"),
], ids=["ctrl-c", "sigterm", "ctrl-c-twice", "sigterm-then-ctrl-c"])
def test_signals_while_waiting_for_the_last_write(tmp_path, monkeypatch, signals, raised, reason):
    """A first signal while the last write is in flight is deferred too: the write lands, then on_training_end
    fires with the signal's reason (the CLI exits 130 / 143). A second one interrupts the wait at once (the write
    itself goes on and lands) and keeps the first one's reason."""
    from super_trainer.checkpoint import wait_for_writes

    real_save, gate, calls = torch.save, threading.Event(), []
    before = (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM))

    def save(obj, f, *args, **kwargs):
        calls.append(1)
        if len(calls) == 1:  # the epoch's checkpoint (a fresh run writes nothing before it)
            for delay, signum in enumerate(signals):
                threading.Timer(0.3 * (delay + 1), os.kill, (os.getpid(), signum)).start()
            if raised is None:
                threading.Timer(0.3 * len(signals) + 0.5, gate.set).start()
            assert gate.wait(30)
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)
    train, reasons = _one_epoch_run(tmp_path, "c")
    _expect_end(train, raised, reason)
    if raised is not None:
        gate.set()
        wait_for_writes()
    assert reasons == [reason]
    assert read_checkpoint(only_run(tmp_path / "c") / "ckpt_latest.pth")["epoch"] == 1
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before  # restored after training


# ---- small states: serialized by save(), written by the writer's thread -------------------------------------

def test_a_small_state_is_serialized_at_save_and_written_in_the_background(tmp_path, monkeypatch):
    monkeypatch.setattr(checkpoint_writer, "SERIALIZE_HERE_BYTES", 1 << 20)
    threads = {"save": [], "write": []}
    real_save, real_write = torch.save, checkpoint_writer.write_with_checksum
    gate = threading.Event()

    def recording_save(obj, f, *args, **kwargs):
        threads["save"].append(threading.current_thread().name)
        return real_save(obj, f, *args, **kwargs)

    def held_write(data, file):
        threads["write"].append(threading.current_thread().name)
        assert gate.wait(10), "test never released the write"
        return real_write(data, file)

    monkeypatch.setattr(torch, "save", recording_save)
    monkeypatch.setattr(checkpoint_writer, "write_with_checksum", held_write)
    weights, history = torch.zeros(4), [{"epoch": 0}]
    writer = CheckpointWriter()
    writer.save({"net": {"w": weights}, "history": history}, tmp_path / "small.pth", tmp_path / "copy.pth")
    assert writer.busy and not (tmp_path / "small.pth").exists()  # the file is still written in the background
    weights.add_(1.0)  # training goes on while the write is in flight
    history[0]["epoch"] = 99
    gate.set()
    writer.close()
    assert threads == {"save": [threading.current_thread().name], "write": [WRITER_THREAD_NAME]}
    for name in ("small.pth", "copy.pth"):
        state = read_checkpoint(tmp_path / name, required_keys=())  # the checksum is verified
        assert torch.equal(state["net"]["w"], torch.zeros(4)) and state["history"] == [{"epoch": 0}]


def test_small_and_large_paths_write_the_same_bytes(tmp_path, monkeypatch):
    state = {"net": {"w": torch.arange(6.0), "b": torch.ones(2)}, "epoch": 2, "history": [{"loss": 0.5}]}
    for threshold, name in ((1 << 20, "here.pth"), (0, "background.pth")):
        monkeypatch.setattr(checkpoint_writer, "SERIALIZE_HERE_BYTES", threshold)
        with CheckpointWriter() as writer:
            writer.save(state, tmp_path / name)
    assert (tmp_path / "here.pth").read_bytes() == (tmp_path / "background.pth").read_bytes()


def test_a_state_over_the_limit_is_copied_and_serialized_in_the_background(tmp_path, monkeypatch):
    monkeypatch.setattr(checkpoint_writer, "SERIALIZE_HERE_BYTES", 64)  # bytes: 17 float32 values are over it
    held = HeldWrites(monkeypatch)
    weights = torch.zeros(17)
    writer = CheckpointWriter()
    writer.save({"w": weights}, tmp_path / "large.pth")
    assert held.started.wait(10)  # torch.save runs on the writer's thread
    weights.add_(1.0)
    held.release()
    writer.close()
    assert torch.equal(torch.load(tmp_path / "large.pth", weights_only=True)["w"], torch.zeros(17))


# ---- the run's last checkpoint: held, then written on the calling thread ------------------------------------

def _recording_writes(monkeypatch):
    """Records the thread of every checkpoint file write (small states: their bytes)."""
    threads = []
    real_write = checkpoint_writer.write_with_checksum

    def write(data, file):
        threads.append(threading.current_thread().name)
        return real_write(data, file)

    monkeypatch.setattr(checkpoint_writer, "write_with_checksum", write)
    return threads


def test_a_held_small_state_is_written_by_flush_on_the_calling_thread(tmp_path, monkeypatch):
    monkeypatch.setattr(checkpoint_writer, "SERIALIZE_HERE_BYTES", 1 << 20)
    threads = _recording_writes(monkeypatch)
    weights = torch.zeros(4)
    writer = CheckpointWriter(report_written=True)
    writer.save_many([({"w": weights}, [tmp_path / "last.pth", tmp_path / "best.pth"])], hold=True)
    weights.add_(1.0)  # serialized at save: later changes are not written
    assert not writer.busy and threads == [] and not (tmp_path / "last.pth").exists()
    writer.flush()
    assert threads == [threading.current_thread().name] and list(writer.written) == [[tmp_path / "last.pth",
                                                                                        tmp_path / "best.pth"]]
    for name in ("last.pth", "best.pth"):
        assert torch.equal(read_checkpoint(tmp_path / name, required_keys=())["w"], torch.zeros(4))
    writer.close()
    assert threads == [threading.current_thread().name]  # no writer thread was ever needed


def test_a_held_state_over_the_limit_is_written_in_the_background(tmp_path, monkeypatch):
    held = HeldWrites(monkeypatch)  # SERIALIZE_HERE_BYTES is 0 here: every state is "large"
    writer = CheckpointWriter()
    writer.save_many([({"w": torch.ones(3)}, [tmp_path / "large.pth"])], hold=True)
    assert held.started.wait(10) and writer.busy  # on the writer's thread, not held back
    held.release()
    writer.close()
    assert torch.equal(torch.load(tmp_path / "large.pth", weights_only=True)["w"], torch.ones(3))


class FailsAtBatch(Callback):
    def on_train_batch_end(self, context):
        if context.batch_idx == 2:
            raise RuntimeError("boom")


def test_a_failure_before_the_first_checkpoint_writes_the_step_0_copy_without_copying_it_again(tmp_path, monkeypatch):
    """The step-0 state is copied to host memory once, at the start; a failure in the first epoch writes that copy
    (for a large state a second copy would double the host memory, maybe at an out-of-memory failure)."""
    copies = []
    real_init = checkpoint_writer._HostCopier.__init__

    def counting_init(self, *args, **kwargs):
        copies.append(threading.current_thread().name)
        real_init(self, *args, **kwargs)

    monkeypatch.setattr(checkpoint_writer._HostCopier, "__init__", counting_init)
    model = make_model()
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(RuntimeError, match="boom"):
        Trainer("fails", tmp_path).train(model=model, training_params=quiet_params(
            max_epochs=2, phase_callbacks=[FailsAtBatch()]), train_loader=make_loader(48, 8))
    assert len(copies) == 1  # the step-0 copy; SERIALIZE_HERE_BYTES is 0 here, so the state counts as large
    written = read_checkpoint(only_run(tmp_path / "fails") / "ckpt_latest.pth")
    assert written["epoch"] == 0 and written["global_step"] == 0
    assert all(torch.equal(written["net"][k], v) for k, v in initial.items())
    assert not any(torch.equal(model.state_dict()[k], v) for k, v in initial.items() if v.dim() == 2)  # it trained


def test_a_held_state_is_written_when_the_interpreter_exits(tmp_path):
    path = tmp_path / "held.pth"
    script = (
        "import torch\n"
        "from super_trainer.checkpoint import CheckpointWriter\n"
        f"CheckpointWriter().save_many([({{'v': torch.arange(10)}}, [{str(path)!r}])], hold=True)\n"
        "raise SystemExit(3)\n"  # never flushed
    )
    proc = subprocess.run([PYTHON, "-c", script], env=python_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 3, proc.stderr
    assert torch.equal(read_checkpoint(path, required_keys=())["v"], torch.arange(10))


def test_a_runs_last_checkpoint_is_written_on_the_training_thread(tmp_path, monkeypatch):
    monkeypatch.setattr(checkpoint_writer, "SERIALIZE_HERE_BYTES", 1 << 20)
    threads = _recording_writes(monkeypatch)
    recorder = Recorder()
    result = Trainer("last", tmp_path).train(model=make_model(), training_params=quiet_params(
        max_epochs=2, phase_callbacks=[recorder]), train_loader=make_loader(), valid_loader=make_loader(16))
    # epoch 0's checkpoint (latest and best) in the background; the last one, which training waits for, here
    assert threads == [WRITER_THREAD_NAME, threading.current_thread().name]
    assert [paths for _, _, paths in recorder.saved] == [
        [result.latest_ckpt_path, result.best_ckpt_path]] * 2  # both announced, the last before on_training_end
    assert recorder.events[-1] == "on_training_end" and recorder.saved[-1][0] == len(recorder.events) - 1
    assert read_checkpoint(result.latest_ckpt_path)["epoch"] == 2


@pytest.mark.parametrize("signals,raised,reason", [
    ((signal.SIGINT,), None, "interrupted"),
    ((signal.SIGINT, signal.SIGINT), KeyboardInterrupt, "interrupted"),
    ((signal.SIGTERM, signal.SIGINT), Terminated, "terminated"),
], ids=["ctrl-c", "ctrl-c-twice", "sigterm-then-ctrl-c"])
def test_signals_during_the_last_write_on_the_training_thread(tmp_path, monkeypatch, signals, raised, reason):
    """The last checkpoint, written on the training thread, is not cut: a first signal during it sets the stop
    reason, a second is raised once the file is complete."""
    monkeypatch.setattr(checkpoint_writer, "SERIALIZE_HERE_BYTES", 1 << 20)
    real_write, done = checkpoint_writer.write_with_checksum, []

    def write(data, file):
        for signum in signals:
            os.kill(os.getpid(), signum)  # handled on this (the main) thread, at its next bytecode
            time.sleep(0.05)
        real_write(data, file)
        done.append(True)

    monkeypatch.setattr(checkpoint_writer, "write_with_checksum", write)
    train, reasons = _one_epoch_run(tmp_path, "sig")

    before = (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM))
    _expect_end(train, raised, reason)
    assert done == [True] and reasons == [reason]
    assert read_checkpoint(only_run(tmp_path / "sig") / "ckpt_latest.pth")["epoch"] == 1
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before
