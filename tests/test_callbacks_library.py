"""The built-in callback library (issue 6): each callback's real effect on a tiny run."""
from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, TensorDataset

from conftest import Recorder, make_loader, make_model, quiet_params
from super_trainer import Callback, Trainer
from super_trainer.callbacks import (
    CancelTrainingCallback,
    GradientNormLogger,
    ReduceLROnPlateauCallback,
    StopOnNonFiniteLoss,
    TrainingStageSwitchCallbackBase,
)
from super_trainer.checkpoint import read_checkpoint
from super_trainer.registry import CALLBACKS


def train(tmp_path, name="lib", model=None, callbacks=(), train_n=32, valid_n=16, **overrides):
    model = model if model is not None else make_model()
    result = Trainer(name, tmp_path).train(
        model=model, training_params=quiet_params(phase_callbacks=list(callbacks), **overrides),
        train_loader=make_loader(train_n, 8), valid_loader=make_loader(valid_n, 8))
    return model, result


def test_every_new_callback_is_registered_by_name():
    for name in ("CancelTrainingCallback", "ReduceLROnPlateauCallback", "StopOnNonFiniteLoss", "GradientNormLogger",
                 "BatchVisualizationCallback", "ModelConversionCheckCallback", "MMCVHookAdapter",
                 "TrainingStageSwitchCallbackBase"):
        assert CALLBACKS.get(name).__name__ == name


def test_docs_callbacks_md_covers_every_registered_callback():
    from conftest import ROOT

    text = (ROOT / "docs" / "callbacks.md").read_text(encoding="utf-8")
    builtin = [name for name in CALLBACKS.names() if CALLBACKS.get(name).__module__.startswith("super_trainer.")]
    assert "CancelTrainingCallback" in builtin  # (other tests register their own callbacks; those are skipped)
    missing = [name for name in builtin if f"`{name}" not in text]
    assert not missing, f"document these built-in callbacks in docs/callbacks.md: {missing}"


# ---- CancelTrainingCallback ---------------------------------------------------------------------------

class TouchStopFile(Callback):
    """Creates .stop_training after `at` train batches."""

    def __init__(self, at):
        self.at = at

    def on_train_batch_end(self, context):
        if context.batches_seen == self.at:
            (context.ckpt_dir / ".stop_training").touch()


@pytest.mark.parametrize("interval, touched_at, stops_at", [(3, 4, 6), (3, 6, 9), (1, 5, 6)])
def test_cancel_file_stops_within_interval_batches(tmp_path, interval, touched_at, stops_at):
    recorder = Recorder()
    _, result = train(tmp_path, callbacks=[CancelTrainingCallback(interval), TouchStopFile(touched_at), recorder],
                      max_epochs=5)
    assert result.stop_reason == "cancelled"
    batch_ends = [d for d in recorder.detail if d[0] == "on_train_batch_end"]
    assert len(batch_ends) == stops_at and stops_at - touched_at <= interval
    assert not (Path(result.ckpt_dir) / ".stop_training").exists()  # removed once honoured, so a resume continues
    # a stop during a batch: ckpt_latest keeps the last completed epoch (4 batches per epoch)
    assert read_checkpoint(Path(result.ckpt_dir) / "ckpt_latest.pth")["epoch"] == stops_at // 4


def test_a_cancelled_run_resumes_to_completion(tmp_path):
    _, cancelled = train(tmp_path, "cancel_resume", callbacks=[CancelTrainingCallback(2), TouchStopFile(5)],
                         max_epochs=3)
    assert cancelled.stop_reason == "cancelled" and len(cancelled.history) == 1
    _, resumed = train(tmp_path, "cancel_resume", callbacks=[CancelTrainingCallback(2)], max_epochs=3, resume=True)
    assert resumed.stop_reason == "completed" and [h["epoch"] for h in resumed.history] == [0, 1, 2]


def test_cancel_rejects_a_bad_interval():
    with pytest.raises(ValueError, match="interval"):
        CancelTrainingCallback(0)


# ---- metrics added by callbacks; ReduceLROnPlateauCallback --------------------------------------------

class ScriptedMetric(Callback):
    """Adds `my_metric` to metrics_dict at on_validation_loader_end, one scripted value per epoch."""

    metric_names = ("my_metric",)

    def __init__(self, values):
        self.values = values

    def on_validation_loader_end(self, context):
        context.metrics_dict["my_metric"] = self.values[context.epoch]


VALUES = [1.0, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 1.1]  # best at epoch 1, then worse and worse (mode min)


def lrs(result):
    return [round(entry["lr"], 10) for entry in result.history]


def test_plateau_drops_lr_only_after_both_patiences(tmp_path):
    # 4 optimizer steps per epoch; the last improvement is epoch 1's validation at step 8.
    # patience=2 is met at epoch 3 (step 16: 8 steps since), iteration_patience=12 only at epoch 4 (step 20).
    plateau = ReduceLROnPlateauCallback(factor=0.1, patience=2, iteration_patience=12)
    _, result = train(tmp_path, "both", callbacks=[ScriptedMetric(VALUES), plateau], max_epochs=7,
                      metric_to_watch="my_metric", greater_metric_to_watch_is_better=False)
    assert lrs(result) == [0.1, 0.1, 0.1, 0.1, 0.1, 0.01, 0.01]
    assert plateau.reductions == 1 and plateau.best == 0.5
    # iteration_patience=0: patience alone decides, one epoch earlier; then again 2 validations later
    plateau = ReduceLROnPlateauCallback("my_metric", "min", factor=0.1, patience=2)
    _, result = train(tmp_path, "patience_only", callbacks=[ScriptedMetric(VALUES), plateau], max_epochs=7)
    assert lrs(result) == [0.1, 0.1, 0.1, 0.1, 0.01, 0.01, 0.001]


def test_plateau_respects_cooldown_min_lr_and_threshold(tmp_path):
    plateau = ReduceLROnPlateauCallback("my_metric", "min", factor=0.5, patience=1, cooldown=1, min_lr=0.03)
    _, result = train(tmp_path, "cool", callbacks=[ScriptedMetric(VALUES), plateau], max_epochs=8)
    # bad at epochs 2..7; reduce at 2, cooldown swallows 3, reduce at 4 (0.025 -> clamped to 0.03), 5 cooldown, 6
    assert lrs(result) == [0.1, 0.1, 0.1, 0.05, 0.05, 0.03, 0.03, 0.03]
    # a relative threshold of 60%: 0.5 is not better enough than 1.0, so epoch 1 is already "bad"
    plateau = ReduceLROnPlateauCallback("my_metric", "min", factor=0.5, patience=1, threshold=0.6)
    _, result = train(tmp_path, "thr", callbacks=[ScriptedMetric(VALUES), plateau], max_epochs=3)
    assert lrs(result) == [0.1, 0.1, 0.05]


def test_plateau_lets_a_model_with_update_param_groups_set_the_lrs(tmp_path):
    class HalfLrHead(nn.Sequential):
        """SuperGradients' model hook: the last layer trains at half the base lr."""

        def update_param_groups(self, param_groups, lr, epoch, iter, training_params, total_batch):
            for group in param_groups:
                group["lr"] = lr / 2 if group["name"] == "2." else lr
            return param_groups

    torch.manual_seed(0)
    model = HalfLrHead(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
    lrs_seen = []

    class Record(Callback):
        def on_train_loader_start(self, context):
            lrs_seen.append([round(g["lr"], 6) for g in context.optimizer.param_groups])

    plateau = ReduceLROnPlateauCallback("my_metric", "min", factor=0.1, patience=1)
    train(tmp_path, "hook", model=model, callbacks=[ScriptedMetric(VALUES), plateau, Record()], max_epochs=4,
          initial_lr={"2.": 0.1, "default": 0.1})
    # one reduction, after epoch 2's validation: the hook sets the head to half the new base lr 0.01
    assert lrs_seen == [[0.1, 0.1], [0.1, 0.1], [0.1, 0.1], [0.005, 0.01]]


def test_plateau_warns_when_a_schedule_would_overwrite_its_lr(tmp_path):
    with pytest.warns(UserWarning, match="lr_mode 'cosine' also sets the lr"):
        train(tmp_path, "cos", callbacks=[ReduceLROnPlateauCallback()], max_epochs=1, lr_mode="cosine")


def test_plateau_resumed_reduces_when_the_uninterrupted_run_does(tmp_path):
    def plateau():
        return ReduceLROnPlateauCallback("my_metric", "min", factor=0.1, patience=2, iteration_patience=12)

    _, straight = train(tmp_path, "p_straight", callbacks=[ScriptedMetric(VALUES), plateau()], max_epochs=7)
    _, stopped = train(tmp_path, "p_resumed", callbacks=[ScriptedMetric(VALUES), plateau(), StopAfterEpoch(3)],
                       max_epochs=7)
    assert len(stopped.history) == 4
    _, resumed = train(tmp_path, "p_resumed", callbacks=[ScriptedMetric(VALUES), plateau()], max_epochs=7,
                       resume=True)
    assert lrs(resumed) == lrs(straight) == [0.1, 0.1, 0.1, 0.1, 0.1, 0.01, 0.01]


def test_plateau_state_is_checkpointed(tmp_path):
    plateau = ReduceLROnPlateauCallback("my_metric", "min", patience=2, iteration_patience=12)
    _, result = train(tmp_path, "state", callbacks=[ScriptedMetric(VALUES), plateau], max_epochs=4)
    saved = read_checkpoint(Path(result.ckpt_dir) / "ckpt_latest.pth")["callbacks"]["ReduceLROnPlateauCallback"]
    assert saved == {"best": 0.5, "bad_validations": 2, "cooldown_left": 0, "last_reset_step": 8, "reductions": 0}


def test_torch_reduce_on_plateau_and_metric_to_watch_see_a_callback_metric(tmp_path):
    # The metric-stepped torch scheduler runs at LOW priority, after the NORMAL callback that adds the metric.
    lr_mode = {"ReduceLROnPlateau": {"metric_name": "my_metric", "mode": "min", "patience": 0, "factor": 0.5}}
    _, result = train(tmp_path, "torch", callbacks=[ScriptedMetric(VALUES)], max_epochs=5, lr_mode=lr_mode,
                      metric_to_watch="my_metric", greater_metric_to_watch_is_better=False)
    assert lrs(result) == [0.1, 0.1, 0.1, 0.05, 0.025]  # no improvement from epoch 2 on: halved after each
    assert result.best_metric == 0.5 and result.best_epoch == 1


def test_metric_to_watch_unknown_to_every_callback_still_fails_before_training(tmp_path):
    class Undeclared(ScriptedMetric):
        metric_names = ()

    with pytest.raises(ValueError, match="my_metric.*valid keys"):
        train(tmp_path, callbacks=[Undeclared(VALUES)], metric_to_watch="my_metric")


# ---- StopOnNonFiniteLoss -------------------------------------------------------------------------------

class NaNInputs(Callback):
    def on_train_batch_start(self, context):
        if context.epoch == 1 and context.batch_idx == 2:
            context.inputs = context.inputs * float("nan")


class SnapshotAtBatchStart(Callback):
    def __init__(self):
        self.snapshots = []

    def on_train_batch_start(self, context):
        self.snapshots.append({k: v.clone() for k, v in context.net.state_dict().items()})


def test_stop_on_non_finite_loss_keeps_the_bad_batch_out_of_the_weights(tmp_path):
    snap = SnapshotAtBatchStart()
    model, result = train(tmp_path, "nan", callbacks=[NaNInputs(), StopOnNonFiniteLoss(), snap], max_epochs=3,
                          stop_on_non_finite_loss=False)
    assert result.stop_reason == "nan_loss"
    assert len(snap.snapshots) == 4 + 3  # the bad batch is the 3rd of epoch 1, and the last to start
    for key, value in model.state_dict().items():
        assert torch.isfinite(value).all()
        assert torch.equal(value, snap.snapshots[-1][key])  # equal to the weights before the bad batch
    # without the callback (and with the trainer's own check off) the NaN reaches the weights
    model, result = train(tmp_path, "nan_unchecked", callbacks=[NaNInputs()], max_epochs=2,
                          stop_on_non_finite_loss=False)
    assert not all(torch.isfinite(v).all() for v in model.state_dict().values())


# ---- GradientNormLogger --------------------------------------------------------------------------------

class ScalarSink:
    """A minimal sg_logger object: records add_scalar calls."""

    def __init__(self):
        self.scalars = []

    def add_scalar(self, tag, value, step):
        self.scalars.append((tag, value, step))


def test_gradient_norm_logger_logs_the_norm_before_clipping(tmp_path):
    sink = ScalarSink()
    model = make_model()
    reference = copy.deepcopy(model)
    lr, max_norm = 0.1, 0.01
    train(tmp_path, "gn", model=model, callbacks=[GradientNormLogger(log_interval=1)], max_epochs=1,
          max_train_batches=3, clip_grad_norm=max_norm, sg_logger=sink, initial_lr=lr,
          optimizer_params={"momentum": 0.0, "weight_decay": 0.0})
    logged = [(v, s) for t, v, s in sink.scalars if t == "Step/Train/grad_norm"]
    assert [s for _, s in logged] == [1, 2, 3]
    # by hand: the norm of the raw gradient, then a clipped SGD step, for each of the 3 batches
    expected = []
    for x, y in list(make_loader(32, 8))[:3]:
        reference.zero_grad()
        nn.functional.cross_entropy(reference(x), y).backward()
        grads = [p.grad for p in reference.parameters()]
        norm = torch.sqrt(sum((g ** 2).sum() for g in grads))
        expected.append(float(norm))
        with torch.no_grad():
            for p in reference.parameters():
                p -= lr * p.grad * min(1.0, max_norm / (float(norm) + 1e-6))
    assert [v for v, _ in logged] == pytest.approx(expected, rel=1e-5)
    assert min(expected) > max_norm  # so a norm taken after clipping would read max_norm


def test_gradient_norm_logger_defaults_to_log_interval(tmp_path):
    sink = ScalarSink()
    train(tmp_path, "gn2", callbacks=[GradientNormLogger()], max_epochs=2, sg_logger=sink, log_interval=3)
    assert [s for t, _, s in sink.scalars if t == "Step/Train/grad_norm"] == [3, 6]


# ---- TrainingStageSwitchCallbackBase -------------------------------------------------------------------

class FreezeFirstLayer(TrainingStageSwitchCallbackBase):
    def __init__(self, next_stage_start_epoch):
        super().__init__(next_stage_start_epoch)
        self.applied_at = []

    def apply_stage_change(self, context):
        self.applied_at.append(context.epoch)
        for param in context.net[0].parameters():
            param.requires_grad_(False)


class SmoothLabels(TrainingStageSwitchCallbackBase):
    """A new criterion from the switch epoch on."""

    def __init__(self, next_stage_start_epoch):
        super().__init__(next_stage_start_epoch)
        self.applied_at = []

    def apply_stage_change(self, context):
        self.applied_at.append(context.epoch)
        context.criterion = nn.CrossEntropyLoss(label_smoothing=0.5)


class StopAfterEpoch(Callback):
    def __init__(self, epoch):
        self.epoch = epoch

    def on_epoch_end(self, context):
        if context.epoch == self.epoch:
            context.stop_training = True


def test_stage_switch_applies_at_its_epoch(tmp_path):
    stage = FreezeFirstLayer(1)
    weights_after_epoch = []

    class Snap(Callback):
        def on_epoch_end(self, context):
            weights_after_epoch.append(context.net[0].weight.detach().clone())

    train(tmp_path, "stage", callbacks=[stage, Snap()], max_epochs=3)
    assert stage.applied_at == [1]
    assert not torch.equal(weights_after_epoch[0], make_model()[0].weight)  # trained in epoch 0
    assert torch.equal(weights_after_epoch[0], weights_after_epoch[2])  # frozen from epoch 1


@pytest.mark.parametrize("stage", [FreezeFirstLayer, SmoothLabels])
def test_stage_switch_survives_resume(tmp_path, stage):
    reference, _ = train(tmp_path, "straight", callbacks=[stage(1)], max_epochs=4)
    first = stage(1)
    _, stopped = train(tmp_path, "resumed", callbacks=[first, StopAfterEpoch(2)], max_epochs=4)
    assert stopped.stop_reason == "stopped_by_callback" and len(stopped.history) == 3 and first.applied_at == [1]
    second = stage(1)
    resumed, _ = train(tmp_path, "resumed", callbacks=[second], max_epochs=4, resume=True)
    assert second.applied_at == [3]  # re-applied at on_training_start of the resumed run
    for key, value in reference.state_dict().items():  # so the resumed run equals the uninterrupted one
        assert torch.equal(value, resumed.state_dict()[key]), key
    # control: resuming without the stage callback trains in the first stage again, so the weights differ
    train(tmp_path, "resumed_copy", callbacks=[stage(1), StopAfterEpoch(2)], max_epochs=4)
    first_stage_again, _ = train(tmp_path, "resumed_copy", max_epochs=4, resume=True)
    assert not torch.equal(first_stage_again[0].weight, reference[0].weight)


def test_stage_switch_needs_apply_stage_change():
    with pytest.raises(NotImplementedError, match="apply_stage_change"):
        TrainingStageSwitchCallbackBase(0).apply_stage_change(None)
