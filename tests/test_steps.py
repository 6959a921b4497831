"""Steps instead of epochs (SPEC §8): max_steps, val_check_interval, save_top_k and on_checkpoint_saved."""
from __future__ import annotations

import math
import re
import threading
from pathlib import Path

import pytest
import torch

from conftest import Recorder, make_loader, make_model, quiet_params
from super_trainer import Callback, Trainer
from super_trainer.checkpoint import read_checkpoint

# make_loader(): 64 samples in batches of 8, so 8 optimizer steps per epoch


def _train(root, *, name="steps", train_loader=None, valid=True, **params):
    return Trainer(name, root, device="cpu").train(
        model=make_model(), training_params=quiet_params(**params), train_loader=train_loader or make_loader(),
        valid_loader=make_loader(16, seed=1) if valid else None)


class Steps(Callback):
    def __init__(self):
        self.steps, self.validations, self.best, self.epoch_ends = 0, [], [], []

    def on_train_batch_gradient_step_end(self, context):
        self.steps += 1

    def on_validation_loader_end(self, context):
        self.validations.append((context.epoch, context.global_step))

    def on_validation_end_best_epoch(self, context):
        self.best.append(context.global_step)

    def on_epoch_end(self, context):
        self.epoch_ends.append(context.epoch)


def test_max_steps_stops_after_exactly_that_many_steps_inside_an_epoch(tmp_path):
    seen = Steps()
    result = _train(tmp_path, max_epochs=None, max_steps=13, phase_callbacks=[seen])
    assert seen.steps == 13 and result.stop_reason == "completed"
    latest = read_checkpoint(Path(result.ckpt_dir) / "ckpt_latest.pth")
    assert (latest["global_step"], latest["epoch"], latest["epoch_progress"]["batches"]) == (13, 1, 5)
    assert seen.validations[-1] == (1, 13)  # the run's end is validated
    assert seen.epoch_ends == [0, 1] and [h["epoch"] for h in result.history] == [0, 1]
    capped = Steps()  # max_epochs given too: whichever comes first
    _train(tmp_path, max_epochs=10, max_steps=13, phase_callbacks=[capped])
    assert capped.steps == 13


def _continuation_params(**overrides):
    # shuffling, momentum and EMA: the state a resume must restore; a constant lr, so the first 13 steps do not
    # depend on the horizon
    return quiet_params(max_epochs=None, optimizer_params={"momentum": 0.9}, ema=True,
                        ema_params={"decay": 0.9, "decay_type": "threshold"}, **overrides)


def test_the_max_steps_checkpoint_continues_bit_exact_to_a_larger_max_steps(tmp_path):
    def run(root, **params):
        model = make_model()
        result = Trainer("grow", root, device="cpu").train(
            model=model, training_params=_continuation_params(**params),
            train_loader=make_loader(shuffle=True), valid_loader=make_loader(16, seed=1))
        return model, result

    full_model, full = run(tmp_path / "a", max_steps=29)
    _, short = run(tmp_path / "b", max_steps=13)
    resumed_model, resumed = run(tmp_path / "b", max_steps=29, resume=True)
    assert resumed.ckpt_dir == short.ckpt_dir
    for key, value in full_model.state_dict().items():
        assert torch.equal(value, resumed_model.state_dict()[key]), key
    a = read_checkpoint(Path(full.ckpt_dir) / "ckpt_latest.pth")
    b = read_checkpoint(Path(resumed.ckpt_dir) / "ckpt_latest.pth")
    assert a["global_step"] == b["global_step"] == 29
    for key, value in a["ema_net"].items():
        assert torch.equal(value, b["ema_net"][key]), key
    assert [h["train/CrossEntropyLoss"] for h in full.history] == [h["train/CrossEntropyLoss"] for h in resumed.history]


class LrAndEma(Callback):
    def __init__(self):
        self.lrs, self.total, self.first = [], None, None

    def on_training_start(self, context):
        self.total = context.total_steps
        self.start = {k: v.clone() for k, v in context.ema_model.ema.state_dict().items()}

    def on_train_batch_gradient_step_end(self, context):  # NORMAL: after the schedule and EMA (VERY_HIGH, HIGH)
        self.lrs.append(context.optimizer.param_groups[0]["lr"])
        if self.first is None:
            self.first = ({k: v.clone() for k, v in context.net.state_dict().items()},
                          {k: v.clone() for k, v in context.ema_model.ema.state_dict().items()})


def test_schedules_and_ema_use_max_steps_as_their_horizon(tmp_path):
    seen = LrAndEma()
    _train(tmp_path, max_epochs=None, max_steps=10, lr_mode="cosine", initial_lr=0.1, ema=True, phase_callbacks=[seen])
    assert seen.total == 10
    r = 0.01  # cosine_final_lr_ratio: lr after step index b is lr0·(0.5·(1 + cos(π·b/(H+1)))·(1 − r) + r), H = 10
    expected = [0.1 * (0.5 * (1 + math.cos(math.pi * b / 11)) * (1 - r) + r) for b in range(10)]
    assert seen.lrs == pytest.approx(expected, rel=1e-12)
    decay = 0.9999 * (1 - math.exp(-15 * 1 / 10))  # EMA's exp decay at step 1 of total_steps 10
    weights, ema = seen.first
    for key, value in ema.items():
        assert torch.allclose(value, decay * seen.start[key] + (1 - decay) * weights[key], atol=1e-7), key


class Order(Recorder):
    pass


def test_an_int_val_check_interval_validates_every_n_steps_with_best_tracking_there(tmp_path):
    seen = Steps()
    result = _train(tmp_path, max_epochs=2, val_check_interval=5, phase_callbacks=[seen])
    assert seen.validations == [(0, 5), (1, 10), (1, 15), (1, 16)]  # and the run's end
    assert seen.best and set(seen.best) <= {5, 10, 15, 16}
    best = read_checkpoint(Path(result.ckpt_dir) / "ckpt_best.pth")
    assert best["global_step"] == seen.best[-1] and best["best_metric"] == result.best_metric
    if seen.best[-1] != 16:  # a best found inside an epoch is a resumable mid-epoch checkpoint
        assert best["epoch_progress"]["batches"] == seen.best[-1] % 8


def test_a_float_val_check_interval_validates_at_that_fraction_of_each_epoch(tmp_path):
    order = Order()
    _train(tmp_path, max_epochs=2, val_check_interval=0.5, phase_callbacks=[order])
    points = [(e, s, order.events[: i].count("on_train_loader_end")) for i, (name, e, _, s) in enumerate(order.detail)
              if name == "on_validation_loader_end"]
    # (epoch, global_step, train passes ended so far): steps 4 and 12 inside the pass, 8 and 16 at the epoch's end
    assert points == [(0, 4, 0), (0, 8, 1), (1, 12, 1), (1, 16, 2)]


class StopAtSecondValidation(Callback):
    def __init__(self):
        self.count = 0

    def on_validation_loader_end(self, context):
        self.count += 1
        if self.count == 2:
            context.stop_training, context.stop_reason = True, "early_stop"


def test_a_stop_decided_at_a_step_validation_ends_the_run_at_that_step(tmp_path):
    seen, order = Steps(), Order()
    result = Trainer("stop", tmp_path, device="cpu").train(
        model=make_model(), training_params=quiet_params(max_epochs=5, val_check_interval=5,
                                                         phase_callbacks=[StopAtSecondValidation(), seen, order]),
        train_loader=make_loader(), valid_loader=make_loader(16, seed=1), test_loaders={"test": make_loader(16)})
    assert result.stop_reason == "early_stop" and seen.steps == 10
    assert seen.validations == [(0, 5), (1, 10)] and seen.epoch_ends == [0, 1]
    assert order.events.count("on_test_loader_end") == 1  # the run's end is tested
    latest = read_checkpoint(Path(result.ckpt_dir) / "ckpt_latest.pth")
    assert (latest["global_step"], latest["epoch_progress"]["batches"]) == (10, 2)


def test_save_top_k_keeps_exactly_the_k_best_each_resumable_bit_exact(tmp_path):
    model = make_model()
    result = Trainer("top", tmp_path, device="cpu").train(
        model=model, training_params=quiet_params(max_epochs=5, save_top_k=2, metric_to_watch="CrossEntropyLoss",
                                                  greater_metric_to_watch_is_better=False),
        train_loader=make_loader(shuffle=True), valid_loader=make_loader(16, seed=1))
    losses = [(h["valid/CrossEntropyLoss"], h["epoch"]) for h in result.history]
    kept = sorted(losses)[:2]
    files = sorted(p.name for p in Path(result.ckpt_dir).glob("ckpt_top_*.pth"))
    assert files == sorted(f"ckpt_top_epoch_{e}_CrossEntropyLoss_{v:.6g}.pth" for v, e in kept)
    for value, epoch in kept:
        path = Path(result.ckpt_dir) / f"ckpt_top_epoch_{epoch}_CrossEntropyLoss_{value:.6g}.pth"
        state = read_checkpoint(path)
        assert state["epoch"] == epoch + 1 and state["metrics"]["CrossEntropyLoss"] == value
        again = make_model(seed=9)  # resuming from the file reproduces the rest of the run
        Trainer("top", tmp_path, device="cpu").train(
            model=again, training_params=quiet_params(max_epochs=5, resume_path=str(path),
                                                      metric_to_watch="CrossEntropyLoss",
                                                      greater_metric_to_watch_is_better=False),
            train_loader=make_loader(shuffle=True), valid_loader=make_loader(16, seed=1))
        for key, value in model.state_dict().items():
            assert torch.equal(value, again.state_dict()[key]), (path.name, key)


def test_a_top_k_file_of_a_step_validation_is_named_with_its_step(tmp_path):
    result = _train(tmp_path, max_epochs=1, val_check_interval=3, save_top_k=1)
    files = [p.name for p in Path(result.ckpt_dir).glob("ckpt_top_*.pth")]
    assert len(files) == 1 and re.fullmatch(r"ckpt_top_epoch_0_(step_[36]_)?Accuracy_[0-9.]+\.pth", files[0])


class Saved(Callback):
    def __init__(self):
        self.calls = []

    def on_checkpoint_saved(self, context):
        assert threading.current_thread() is threading.main_thread()
        states = {Path(p).name: read_checkpoint(p) for p in context.checkpoint_paths}  # complete, loadable
        self.calls.append((context.global_step, states))

    def on_training_end(self, context):
        self.calls.append("end")


def test_on_checkpoint_saved_sees_complete_files_on_the_training_thread(tmp_path):
    saved = Saved()
    result = _train(tmp_path, max_epochs=3, save_ckpt_every_n_steps=3, phase_callbacks=[saved])
    assert saved.calls[-1] == "end" and len(saved.calls) > 3
    steps = [states["ckpt_latest.pth"]["global_step"] for _, states in saved.calls[:-1]]
    assert steps == sorted(steps) and steps[-1] == 24  # every write announced, the last before on_training_end
    announced_at = [step for step, _ in saved.calls[:-1]]
    assert all(at >= step for at, step in zip(announced_at, steps))  # never before the write happened
    assert any("ckpt_best.pth" in states for _, states in saved.calls[:-1])
    assert len(saved.calls) - 1 == 7 + 3  # one per write: steps 3, 6, 9, 12, 15, 18, 21 and the 3 epoch ends


def test_checkpoints_of_step_validations_resume_bit_exact(tmp_path):
    def run(**overrides):
        model = make_model()
        result = Trainer("mid", tmp_path, device="cpu").train(
            model=model, training_params=quiet_params(
                max_epochs=3, val_check_interval=5, save_top_k=4, metric_to_watch="CrossEntropyLoss",
                greater_metric_to_watch_is_better=False, optimizer_params={"momentum": 0.9}, **overrides),
            train_loader=make_loader(shuffle=True), valid_loader=make_loader(16, seed=1))
        return model, result

    model, full = run()
    mid_epoch = sorted(Path(full.ckpt_dir).glob("ckpt_top_epoch_*_step_*.pth"))
    assert len(mid_epoch) >= 2  # validations at steps 5, 10, 15, 20 fall inside epochs (8 steps each)
    for path in mid_epoch[:2]:
        assert read_checkpoint(path)["epoch_progress"] is not None
        resumed_model, resumed = run(resume_path=str(path))
        for key, value in model.state_dict().items():
            assert torch.equal(value, resumed_model.state_dict()[key]), (path.name, key)
        assert [h["valid/CrossEntropyLoss"] for h in resumed.history] == \
            [h["valid/CrossEntropyLoss"] for h in full.history]
