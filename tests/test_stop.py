"""stop_training semantics (SPEC §1): inside a batch vs elsewhere, reasons, NaN never reaching the weights."""
from __future__ import annotations

import math

import torch

from conftest import Recorder, make_loader, make_model, only_run, quiet_params
from super_trainer import Callback, Trainer
from super_trainer.checkpoint import read_checkpoint


def run(tmp_path, callbacks, **overrides):
    recorder = Recorder()
    model = make_model()
    result = Trainer("stop", tmp_path).train(
        model=model, training_params=quiet_params(phase_callbacks=[*callbacks, recorder], **overrides),
        train_loader=make_loader(32, 8), valid_loader=make_loader(16, 8), test_loaders={"t": make_loader(8, 8)})
    return model, result, recorder


def test_nan_loss_caught_at_loss_end_never_reaches_the_weights(tmp_path):
    class NaNAtEpoch1(Callback):
        def on_train_batch_start(self, context):
            if context.epoch == 1 and context.batch_idx == 2:
                context.inputs = context.inputs * float("nan")

    class StopOnNaN(Callback):
        priority = "HIGH"

        def on_train_batch_loss_end(self, context):
            if not torch.isfinite(context.loss):
                context.stop_training, context.stop_reason = True, "nan_loss"

    snapshots = []

    class Snap(Callback):
        def on_train_batch_end(self, context):
            snapshots.append({k: v.clone() for k, v in context.net.state_dict().items()})

    model, result, recorder = run(tmp_path, [NaNAtEpoch1(), StopOnNaN(), Snap()], max_epochs=3)
    assert result.stop_reason == "nan_loss"
    assert all(torch.isfinite(v).all() for v in model.state_dict().values())
    # the batch that produced NaN ran no backward and no step: weights equal those after the batch before it
    for key, value in snapshots[-2].items():
        assert torch.equal(value, model.state_dict()[key])
    tail = recorder.events[recorder.events.index("on_train_batch_loss_end", len(recorder.events) - 6):]
    assert tail == ["on_train_batch_loss_end", "on_train_batch_end", "on_train_loader_end", "on_training_end"]
    # the partial epoch is neither validated, tested nor checkpointed
    assert recorder.events.count("on_validation_loader_start") == 1
    assert "on_test_loader_start" not in recorder.events
    assert read_checkpoint(only_run(tmp_path / "stop") / "ckpt_latest.pth")["epoch"] == 1
    assert [h["epoch"] for h in result.history] == [0]


def test_stop_set_at_gradient_step_start_skips_the_step(tmp_path):
    class StopBeforeStep(Callback):
        def on_train_batch_gradient_step_start(self, context):
            if context.batch_idx == 1:
                context.stop_training = True

    _, result, recorder = run(tmp_path, [StopBeforeStep()])
    assert recorder.events.count("on_train_batch_gradient_step_end") == 1
    assert result.stop_reason == "stopped_by_callback"


def test_stop_outside_a_batch_finishes_the_epoch(tmp_path):
    class EarlyStop(Callback):
        def on_validation_loader_end(self, context):
            if context.epoch == 1:
                context.stop_training, context.stop_reason = True, "early_stop"

    _, result, recorder = run(tmp_path, [EarlyStop()], max_epochs=5)
    assert result.stop_reason == "early_stop"
    assert [h["epoch"] for h in result.history] == [0, 1]
    assert read_checkpoint(only_run(tmp_path / "stop") / "ckpt_latest.pth")["epoch"] == 2  # epoch 1 was saved
    assert recorder.events.count("on_test_loader_start") == 1  # the (last) epoch's test ran
    assert recorder.events[-4:] == ["on_test_batch_end", "on_test_loader_end", "on_epoch_end", "on_training_end"]
    assert math.isfinite(result.test_metrics["t"]["Accuracy"])


def test_stop_at_training_start_runs_one_epoch(tmp_path):
    class StopNow(Callback):
        def on_training_start(self, context):
            context.stop_training = True

    _, result, _ = run(tmp_path, [StopNow()], max_epochs=4)
    assert [h["epoch"] for h in result.history] == [0]
    assert result.stop_reason == "stopped_by_callback"
