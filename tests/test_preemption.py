"""Preemption and nothing silently wrong (SPEC §8 "Preemption", "No silent wrong results"): SIGTERM like the first
Ctrl-C, exact resumes (train metrics, persistent workers), no NaN weights in a checkpoint, on_epoch_end's metrics,
and one warning for changed training_params on resume. The kill-from-outside tests are in test_resume.py and
test_distributed.py."""
from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from torch.utils.data import DataLoader

from conftest import make_data, make_loader, make_model, python_env, quiet_params, only_run
from super_trainer import Callback, Trainer
from super_trainer.checkpoint import read_checkpoint, wait_for_writes


def _history(result):
    return [{k: v for k, v in entry.items() if k != "seconds"} for entry in result.history]


def _assert_same_weights(a, b):
    for key, value in a.state_dict().items():
        assert torch.equal(value, b.state_dict()[key]), key


class SignalAt(Callback):
    """Sends ``signals`` to this process while train batch (epoch, batch_idx) runs (at its start)."""

    def __init__(self, epoch, batch, *signals):
        self.at, self.signals = (epoch, batch), signals or (signal.SIGTERM,)

    def on_train_batch_start(self, context):
        if (context.epoch, context.batch_idx) == self.at:
            for signum in self.signals:
                os.kill(os.getpid(), signum)


class Ends(Callback):
    """What on_training_end sees: the stop reason, and the checkpoint on disk (it must have landed)."""

    def __init__(self):
        self.seen = []

    def on_training_end(self, context):
        latest = read_checkpoint(context.ckpt_dir / "ckpt_latest.pth")
        self.seen.append((context.stop_reason, latest["epoch"], (latest.get("epoch_progress") or {}).get("batches")))


def _train(root, name, callbacks=(), loaders=None, model=None, **overrides):
    model = model if model is not None else make_model()
    train_loader, valid_loader = loaders or (make_loader(48, 8, shuffle=True), make_loader(16, 8, seed=1))
    params = quiet_params(**{"max_epochs": 3, "optimizer_params": {"momentum": 0.9}, "train_metrics_list": ["Accuracy"],
                             "phase_callbacks": list(callbacks), **overrides})
    result = Trainer(name, root).train(model=model, training_params=params, train_loader=train_loader,
                                       valid_loader=valid_loader)
    return model, result


# ---- SIGTERM -------------------------------------------------------------------------------------------

def test_sigterm_from_inside_checkpoints_the_batch_and_resumes_bit_exact(tmp_path):
    full_model, full = _train(tmp_path, "full")
    ends = Ends()
    before = (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM))
    _, stopped = _train(tmp_path, "cut", [SignalAt(1, 2), ends])
    assert stopped.stop_reason == "terminated"
    assert ends.seen == [("terminated", 1, 3)]  # the batch finished, and its checkpoint landed before the event
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before  # handlers restored
    assert [h["epoch"] for h in stopped.history] == [0]  # the cut epoch is not in the history
    model, resumed = _train(tmp_path, "cut", resume=True)
    assert resumed.stop_reason == "completed"
    _assert_same_weights(full_model, model)
    assert _history(resumed) == _history(full)  # train/Accuracy of the cut epoch covers the whole epoch


@pytest.mark.parametrize("signals,reason", [((signal.SIGTERM, signal.SIGINT), "terminated"),
                                            ((signal.SIGINT, signal.SIGTERM), "interrupted")],
                         ids=["sigterm-then-ctrl-c", "ctrl-c-then-sigterm"])
def test_a_second_signal_interrupts_at_once_and_keeps_the_first_reason(tmp_path, signals, reason):
    ends, batches = Ends(), []

    class Count(Callback):
        def on_train_batch_end(self, context):
            batches.append((context.epoch, context.batch_idx))

    _, result = _train(tmp_path, "twice", [SignalAt(1, 2, *signals), ends, Count()])
    assert result.stop_reason == reason
    # interrupted before backward: the batch's end still fires, the checkpoint is at the batch before it
    assert batches[-1] == (1, 2) and ends.seen == [(reason, 1, 2)]


def test_sigterm_during_validation_stops_there_without_a_checkpoint_of_the_epoch(tmp_path):
    seen = []

    class TermInValidation(Callback):
        def on_validation_batch_start(self, context):
            seen.append((context.epoch, context.batch_idx))
            if (context.epoch, context.batch_idx) == (1, 0):
                os.kill(os.getpid(), signal.SIGTERM)

    ends = Ends()
    _, result = _train(tmp_path, "val", [TermInValidation(), ends])
    assert result.stop_reason == "terminated"
    assert seen[-1] == (1, 0)  # the pass stopped at its next batch
    assert ends.seen == [("terminated", 1, None)]  # ckpt_latest is epoch 0's end


def test_cli_exits_143_after_sigterm_with_the_checkpoint_written(tmp_path):
    (tmp_path / "term_callbacks.py").write_text(
        "import os, signal\nfrom super_trainer import Callback\nfrom super_trainer.registry import CALLBACKS\n\n"
        "@CALLBACKS.register\nclass TermAt(Callback):\n    def on_train_batch_start(self, context):\n"
        "        if (context.epoch, context.batch_idx) == (1, 2):\n"
        "            os.kill(os.getpid(), signal.SIGTERM)\n")
    (tmp_path / "recipes").mkdir()
    (tmp_path / "recipes" / "term.yaml").write_text(
        "defaults:\n  - default\n  - _self_\nexperiment_name: term\ncustom_imports: [term_callbacks]\n"
        "training_hyperparams:\n  max_epochs: 3\n  progress_bar: false\n  phase_callbacks:\n    - TermAt: {}\n")
    cli = str(Path(sys.executable).parent / "super-trainer")
    proc = subprocess.run([cli, "--config-dir", str(tmp_path / "recipes"), "--config-name=term",
                           f"ckpt_root_dir={tmp_path}"], cwd=tmp_path, env=python_env(), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 143, proc.stderr[-2000:]
    latest = read_checkpoint(only_run(tmp_path / "term") / "ckpt_latest.pth")
    assert (latest["epoch"], latest["epoch_progress"]["batches"]) == (1, 3)
    assert (only_run(tmp_path / "term") / "experiment.log").read_text().strip().endswith("training ended: terminated")
    resume_from = only_run(tmp_path / "term") / "ckpt_latest.pth"
    assert f"Training terminated in epoch 2/3 | resume from {resume_from}" in proc.stdout


def test_cli_help_documents_exit_code_143():
    from super_trainer.cli import _help

    assert "143  terminated by SIGTERM" in _help()


# ---- persistent workers ------------------------------------------------------------------------------------

class HardKill(Exception):
    """Stands for a SIGKILL: the run ends where it is, leaving only what was checkpointed before."""


class KillAt(Callback):
    def __init__(self, batches_seen=None, epoch=None):
        self.batches_seen, self.epoch = batches_seen, epoch

    def on_train_loader_start(self, context):
        if context.epoch == self.epoch:
            wait_for_writes()
            raise HardKill

    def on_train_batch_start(self, context):
        if context.batches_seen == self.batches_seen:
            wait_for_writes()
            raise HardKill


def _worker_loaders():
    """Shuffled train and valid loaders with two persistent workers each (the valid loader's iterator is reused
    from the second validation on, like the train loader's from the second epoch on)."""
    train = DataLoader(make_data(48, seed=3), batch_size=8, shuffle=True, num_workers=2, persistent_workers=True)
    valid = DataLoader(make_data(16, seed=4), batch_size=8, shuffle=True, num_workers=2, persistent_workers=True)
    return train, valid


@pytest.fixture(scope="module")
def persistent_full(tmp_path_factory):
    model, result = _train(tmp_path_factory.mktemp("persistent"), "full", loaders=_worker_loaders(),
                           save_ckpt_every_n_steps=2)
    return model, _history(result)


# 6 batches an epoch, a checkpoint every 2 steps and at every epoch's end.
@pytest.mark.parametrize("stopper,where", [
    (lambda: KillAt(epoch=1), (1, None)),
    (lambda: KillAt(batches_seen=3), (0, 2)),
    (lambda: KillAt(batches_seen=9), (1, 2)),
    (lambda: SignalAt(1, 2), (1, 3)),
], ids=["epoch-boundary", "mid-epoch-0", "mid-epoch-1", "sigterm-mid-epoch-1"])
def test_persistent_workers_resume_exactly_at_every_kill_point(tmp_path, persistent_full, stopper, where):
    full_model, full_history = persistent_full
    try:
        _train(tmp_path, "cut", [stopper()], loaders=_worker_loaders(), save_ckpt_every_n_steps=2)
    except HardKill:
        pass
    latest = read_checkpoint(only_run(tmp_path / "cut") / "ckpt_latest.pth")
    assert (latest["epoch"], (latest.get("epoch_progress") or {}).get("batches")) == where
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model, resumed = _train(tmp_path, "cut", loaders=_worker_loaders(), save_ckpt_every_n_steps=2, resume=True)
    _assert_same_weights(full_model, model)
    assert _history(resumed) == full_history
    told = [w for w in caught if str(w.message).startswith("resume with persistent_workers")]
    assert len(told) == (1 if where[0] > 0 else 0)  # once; a resume inside epoch 0 creates its iterator as then


# ---- non-finite weights ------------------------------------------------------------------------------------

class ZeroVectorNorm(nn.Module):
    """A classifier whose side branch, when armed, adds the norm of a zero vector: the loss stays finite but the
    gradient of sqrt at 0 is NaN, so the side branch's weights become NaN (and no later loss shows it)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
        self.side = nn.Linear(8, 4)
        self.armed = False

    def forward(self, x):
        out = self.body(x)
        if self.armed:
            zero = self.side(x) * 0.0
            out = out + (zero * zero).sum(dim=1, keepdim=True).sqrt()
        return out


class Arm(Callback):
    def __init__(self, model, epoch, batch, then_signal=None):
        self.model, self.at, self.then_signal = model, (epoch, batch), then_signal

    def on_train_batch_start(self, context):
        self.model.armed = (context.epoch, context.batch_idx) == self.at
        if self.model.armed and self.then_signal is not None:
            os.kill(os.getpid(), self.then_signal)

    def on_train_batch_loss_end(self, context):
        if self.model.armed:
            assert torch.isfinite(context.loss)  # the loss never shows it


def _all_finite(state):
    return all(bool(torch.isfinite(value).all()) for value in state.values() if value.is_floating_point())


@pytest.mark.parametrize("every,then_signal,latest_at", [
    (None, None, (1, None)),          # the epoch's end: not validated, not checkpointed
    (1, None, (1, 2)),                # the next step checkpoint is refused
    (None, signal.SIGTERM, (1, None)),  # the SIGTERM checkpoint is refused
], ids=["epoch-end", "step-checkpoint", "sigterm-checkpoint"])
def test_nan_gradient_with_a_finite_loss_never_reaches_a_checkpoint(tmp_path, every, then_signal, latest_at):
    model = ZeroVectorNorm()
    validated = []

    class Validated(Callback):
        def on_validation_loader_end(self, context):
            validated.append(context.epoch)

    _, result = _train(tmp_path, "nan", [Arm(model, 1, 2, then_signal), Validated()], model=model,
                       save_ckpt_every_n_steps=every, max_epochs=4)
    assert result.stop_reason == "nan_loss"
    assert validated == [0]
    assert not _all_finite(model.state_dict())  # the weights really are NaN
    latest = read_checkpoint(only_run(tmp_path / "nan") / "ckpt_latest.pth")
    best = read_checkpoint(only_run(tmp_path / "nan") / "ckpt_best.pth")  # metric_to_watch is Accuracy
    assert (latest["epoch"], (latest.get("epoch_progress") or {}).get("batches")) == latest_at
    assert _all_finite(latest["net"]) and _all_finite(best["net"])


def test_the_weights_check_is_off_with_stop_on_non_finite_loss_false(tmp_path):
    model = ZeroVectorNorm()
    _, result = _train(tmp_path, "off", [Arm(model, 0, 2)], model=model, stop_on_non_finite_loss=False, max_epochs=1)
    assert result.stop_reason == "completed"
    assert not _all_finite(read_checkpoint(only_run(tmp_path / "off") / "ckpt_latest.pth")["net"])  # as asked


# ---- on_epoch_end's metrics, changed params on resume ------------------------------------------------------

def test_on_epoch_end_sees_the_validation_metrics_not_the_test_metrics(tmp_path):
    seen = []

    class AtEpochEnd(Callback):
        def on_epoch_end(self, context):
            seen.append((dict(context.metrics_dict), dict(context.test_metrics["odd"])))

    model = make_model()
    result = Trainer("m", tmp_path).train(
        model=model, training_params=quiet_params(max_epochs=2, run_test_freq=1, phase_callbacks=[AtEpochEnd()]),
        train_loader=make_loader(48, 8, shuffle=True), valid_loader=make_loader(16, 8, seed=1),
        test_loaders={"odd": make_loader(40, 8, seed=5)})
    for (metrics, test), entry in zip(seen, result.history):
        assert metrics == {k[len("valid/"):]: v for k, v in entry.items() if k.startswith("valid/")}
        assert metrics != test


def test_resume_lists_changed_params_in_one_warning(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="super_trainer")
    _train(tmp_path, "p", max_epochs=1, initial_lr=0.1)
    with pytest.warns(UserWarning, match="take effect: max_epochs 1 -> 2$"):  # extending a run: said, too
        _train(tmp_path, "p", max_epochs=2, initial_lr=0.1, resume=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _, result = _train(tmp_path, "p", max_epochs=3, initial_lr=0.05, seed=7, batch_accumulate=2, resume=True)
    told = [str(w.message) for w in caught if "training_params differ" in str(w.message)]
    assert len(told) == 1, told
    message = told[0]
    applied, kept = message.split("do NOT take effect")
    assert "max_epochs 2 -> 3" in applied and "batch_accumulate 1 -> 2" in applied
    assert "initial_lr 0.1 -> 0.05" in kept and "seed 42 -> 7" in kept and "resume" not in message.split(";", 1)[1]
    assert result.history[2]["lr"] == 0.1  # as the warning says: the restored param group keeps its lr0
    assert read_checkpoint(only_run(tmp_path / "p") / "ckpt_latest.pth")["training_params"]["initial_lr"] == 0.05
