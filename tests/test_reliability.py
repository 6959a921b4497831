"""SPEC §7 "Non-finite loss", "Loud failures" and max_keep_ckpts: nothing lost, nothing silent."""
from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, TensorDataset

from conftest import Recorder, make_loader, make_model, only_run, quiet_params
from super_trainer import Callback, CheckpointError, EarlyStop, Trainer
from super_trainer.checkpoint import read_checkpoint


class PoisonAtEpoch(Callback):
    """Turns the inputs of one batch of epoch ``epoch`` into NaN (as a bad sample or an lr blow-up would)."""

    def __init__(self, epoch, batch=1):
        self.epoch, self.batch = epoch, batch

    def on_train_batch_start(self, context):
        if context.epoch == self.epoch and context.batch_idx == self.batch:
            context.inputs = torch.full_like(context.inputs, float("nan"))


def _all_finite(state_dict):
    return all(torch.isfinite(v).all() for v in state_dict.values() if v.is_floating_point())


def test_nan_loss_stops_and_keeps_the_last_good_checkpoints(tmp_path):
    result = Trainer("nan", tmp_path).train(
        model=make_model(), training_params=quiet_params(max_epochs=5, phase_callbacks=[PoisonAtEpoch(2)]),
        train_loader=make_loader(48, 8), valid_loader=make_loader(16, 8))
    assert result.stop_reason == "nan_loss"
    assert [h["epoch"] for h in result.history] == [0, 1]  # epoch 2 was neither validated nor recorded
    latest = read_checkpoint(only_run(tmp_path / "nan") / "ckpt_latest.pth")
    best = read_checkpoint(only_run(tmp_path / "nan") / "ckpt_best.pth")
    assert latest["epoch"] == 2 and best["epoch"] <= 2
    assert _all_finite(latest["net"]) and _all_finite(best["net"])


def test_nan_guard_checks_every_log_interval_steps_mid_epoch(tmp_path):
    recorder = Recorder()
    result = Trainer("nan_mid", tmp_path).train(
        model=make_model(), training_params=quiet_params(max_epochs=1, log_interval=2,
                                                         phase_callbacks=[PoisonAtEpoch(0, batch=1), recorder]),
        train_loader=make_loader(80, 8), valid_loader=make_loader(16, 8))
    assert result.stop_reason == "nan_loss"
    # the NaN of batch 1 is read at step 2 (log_interval): batches 2..9 never start
    assert recorder.events.count("on_train_batch_start") == 2
    assert "on_validation_loader_start" not in recorder.events


def test_nan_guard_can_be_switched_off(tmp_path):
    result = Trainer("nan_off", tmp_path).train(
        model=make_model(), training_params=quiet_params(max_epochs=2, stop_on_non_finite_loss=False,
                                                         phase_callbacks=[PoisonAtEpoch(0)]),
        train_loader=make_loader(24, 8), valid_loader=make_loader(16, 8))
    assert result.stop_reason == "completed"
    assert math.isnan(result.history[0]["train/CrossEntropyLoss"])


def test_nan_guard_adds_no_per_step_host_sync(tmp_path, monkeypatch):
    """The guard reads the device once every log_interval steps, never per batch."""
    from super_trainer.metrics import LossAverager

    calls = []
    real_read = LossAverager.all_finite_since_check  # the guard's one read (a host sync) of the losses
    monkeypatch.setattr(LossAverager, "all_finite_since_check", lambda self: calls.append(1) or real_read(self))
    Trainer("sync", tmp_path).train(model=make_model(), training_params=quiet_params(max_epochs=1, log_interval=4),
                                    train_loader=make_loader(128, 8), valid_loader=None)
    assert len(calls) == 16 // 4  # 16 steps, one check per 4 steps


def test_empty_train_loader_is_an_error_before_any_event(tmp_path):
    recorder = Recorder()
    empty = DataLoader(TensorDataset(torch.zeros(0, 8), torch.zeros(0, dtype=torch.long)), batch_size=4)
    with pytest.raises(ValueError, match="train_loader has no batches"):
        Trainer("empty", tmp_path).train(model=make_model(), training_params=quiet_params(phase_callbacks=[recorder]),
                                         train_loader=empty)
    assert recorder.events == []
    with pytest.raises(ValueError, match="valid_loader has no batches"):
        Trainer("empty", tmp_path).train(model=make_model(), training_params=quiet_params(), train_loader=make_loader(),
                                         valid_loader=empty)


def test_resuming_another_optimizers_checkpoint_is_a_checkpoint_error(tmp_path):
    Trainer("opt", tmp_path).train(model=make_model(), training_params=quiet_params(max_epochs=1),
                                   train_loader=make_loader(), valid_loader=make_loader(16))
    recorder = Recorder()
    with pytest.raises(CheckpointError, match="SGD state but this run's optimizer is Adam"):
        Trainer("opt", tmp_path).train(
            model=make_model(), training_params=quiet_params(max_epochs=2, optimizer="Adam", resume=True,
                                                             phase_callbacks=[recorder]),
            train_loader=make_loader(), valid_loader=make_loader(16))
    assert recorder.events == ["on_optimizer_built"]  # the file is fine; the optimizer does not fit: after that event


def test_unloadable_callback_state_fails_at_the_first_write_naming_its_key(tmp_path):
    class Opaque(Callback):
        state_key = "opaque-state"

        def state_dict(self):
            return {"when": object()}  # weights_only loading refuses arbitrary objects

        def load_state_dict(self, state):
            pass

    recorder = Recorder()
    with pytest.raises(ValueError, match="'opaque-state' cannot be checkpointed"):
        Trainer("opaque", tmp_path).train(model=make_model(),
                                          training_params=quiet_params(phase_callbacks=[Opaque(), recorder]),
                                          train_loader=make_loader(), valid_loader=make_loader(16))
    assert "on_train_batch_start" not in recorder.events  # found at the step-0 checkpoint, before training


def test_foreign_hook_names_warn_once_with_the_closest_event():
    class LightningStyle(Callback):
        def on_train_epoch_end(self, context):
            pass

        def on_validaton_loader_end(self, context):  # a typo
            pass

    with pytest.warns(UserWarning) as caught:
        from super_trainer import CallbackHandler

        CallbackHandler([LightningStyle()])
    messages = [str(w.message) for w in caught]
    assert any("LightningStyle.on_train_epoch_end" in m and "on_train_loader_end or on_epoch_end" in m
               for m in messages)
    assert any("on_validaton_loader_end" in m and "closest event is on_validation_loader_end" in m for m in messages)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        CallbackHandler([LightningStyle()])  # once per class and name


def test_a_raising_on_training_end_does_not_skip_the_others(tmp_path):
    class Broken(Callback):
        def on_training_end(self, context):
            raise RuntimeError("broken logger")

    later = Recorder()
    later.priority = 90
    with pytest.raises(RuntimeError, match="broken logger"):
        Trainer("end", tmp_path).train(model=make_model(),
                                       training_params=quiet_params(max_epochs=1, phase_callbacks=[Broken(), later]),
                                       train_loader=make_loader(), valid_loader=make_loader(16))
    assert later.events[-1] == "on_training_end"


def test_a_second_train_with_the_same_callbacks_behaves_like_the_first(tmp_path):
    stopper = EarlyStop(patience=1, min_delta=10.0, metric="Accuracy", mode="max") \
        if "monitor" not in EarlyStop.__init__.__code__.co_varnames else \
        EarlyStop(phase="VALIDATION_EPOCH_END", monitor="Accuracy", mode="max", patience=1, min_delta=10.0)
    results = []
    for run in range(2):
        results.append(Trainer(f"again{run}", tmp_path).train(
            model=make_model(), training_params=quiet_params(max_epochs=5, phase_callbacks=[stopper]),
            train_loader=make_loader(), valid_loader=make_loader(16)))
    assert [len(r.history) for r in results] == [2, 2]  # patience 1: the first epoch sets best, the second stops
    assert results[0].stop_reason == results[1].stop_reason == "early_stop"


def test_max_keep_ckpts_keeps_the_newest_epoch_files(tmp_path):
    Trainer("keep", tmp_path).train(
        model=make_model(), training_params=quiet_params(max_epochs=4, save_ckpt_epoch_list=[1, 2, 3, 4],
                                                         max_keep_ckpts=2),
        train_loader=make_loader(), valid_loader=make_loader(16))
    assert sorted(p.name for p in only_run(tmp_path / "keep").glob("ckpt_epoch_*.pth")) == ["ckpt_epoch_3.pth",
                                                                                  "ckpt_epoch_4.pth"]


def test_mid_epoch_resume_with_a_distributed_sampler_is_exact(tmp_path):
    """The loader is re-created after on_train_loader_start, so the sampler's set_epoch applies to the resumed
    epoch as it did to the original one (here rank 0 of 2, without a process group)."""
    from torch.utils.data import DistributedSampler

    from conftest import make_data

    class SetEpoch(Callback):
        def __init__(self, sampler):
            self.sampler = sampler

        def on_train_loader_start(self, context):
            self.sampler.set_epoch(context.epoch)

    class CtrlCAt(Callback):
        def on_train_batch_end(self, context):
            if context.epoch == 1 and context.batch_idx == 2:
                raise KeyboardInterrupt

    def run(name, extra, resume=False):
        data = make_data(96, seed=3)
        sampler = DistributedSampler(data, num_replicas=2, rank=0, shuffle=True, seed=7)
        loader = DataLoader(data, batch_size=8, sampler=sampler)
        model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Dropout(0.3), nn.Linear(16, 3))
        torch.manual_seed(5)
        for p in model.parameters():
            nn.init.normal_(p, std=0.3)
        result = Trainer(name, tmp_path).train(
            model=model, training_params=quiet_params(max_epochs=3, optimizer_params={"momentum": 0.9},
                                                      phase_callbacks=[SetEpoch(sampler), *extra], resume=resume),
            train_loader=loader, valid_loader=make_loader(16, 8))
        return model, result

    full, _ = run("full", [])
    _, stopped = run("cut", [CtrlCAt()])
    assert stopped.stop_reason == "interrupted"
    assert read_checkpoint(only_run(tmp_path / "cut") / "ckpt_latest.pth")["epoch_progress"]["batches"] == 3
    resumed, result = run("cut", [], resume=True)
    assert result.stop_reason == "completed"
    for a, b in zip(full.state_dict().values(), resumed.state_dict().values()):
        assert torch.equal(a, b)
