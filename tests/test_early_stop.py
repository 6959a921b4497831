"""EarlyStop: patience, min_delta, mode, non-finite values, state across resume."""
from __future__ import annotations

import math

import pytest

from conftest import make_loader, make_model, quiet_params
from super_trainer import Callback, Trainer
from super_trainer.callbacks import EarlyStop
from super_trainer.callbacks.base import PhaseContext
from super_trainer.params import TrainingParams


def feed(callback, values, greater=True):
    context = PhaseContext(metric_to_watch="Acc", training_params=TrainingParams(greater_metric_to_watch_is_better=greater))
    callback.on_training_start(context)
    stopped_at = None
    for epoch, value in enumerate(values):
        context.update_context(epoch=epoch, metrics_dict={"Acc": value})
        callback.on_validation_loader_end(context)
        if context.stop_training and stopped_at is None:
            stopped_at = epoch
    return stopped_at, context


def test_patience_and_min_delta():
    assert feed(EarlyStop(patience=2), [0.5, 0.6, 0.6, 0.59, 0.7])[0] == 3
    assert feed(EarlyStop(patience=2, min_delta=0.05), [0.5, 0.54, 0.53, 0.6])[0] == 2  # +0.04 over best is no gain
    assert feed(EarlyStop(patience=2, min_delta=0.05), [0.5, 0.54, 0.58, 0.6])[0] is None  # 0.58 beats 0.5 by 0.08
    assert feed(EarlyStop(patience=3), [0.5, 0.6, 0.7, 0.8])[0] is None


def test_mode_from_params_and_explicit():
    assert feed(EarlyStop(patience=1), [1.0, 0.9, 1.1], greater=False)[0] == 2  # loss-like: lower is better
    assert feed(EarlyStop(patience=1, mode="max"), [1.0, 0.9], greater=False)[0] == 1


def test_non_finite_stops_at_once():
    stopped_at, context = feed(EarlyStop(patience=10), [0.5, math.nan])
    assert stopped_at == 1 and context.stop_reason == "early_stop"


def test_in_training_stops_after_the_epoch_and_resumes_its_state(tmp_path):
    class Flat(Callback):
        priority = "HIGH"

        def on_validation_loader_end(self, context):
            context.metrics_dict["Flat"] = 1.0  # never improves after the first validation

    def run(max_epochs, resume):
        stopper = EarlyStop(patience=2, metric="Flat", mode="max")
        result = Trainer("es", tmp_path).train(model=make_model(), training_params=quiet_params(
            max_epochs=max_epochs, resume=resume, phase_callbacks=[Flat(), stopper]),
            train_loader=make_loader(), valid_loader=make_loader(16))
        return result, stopper

    result, stopper = run(2, False)  # epochs 0, 1: one validation without improvement
    assert result.stop_reason == "completed" and stopper.bad_validations == 1
    result, stopper = run(6, True)  # the count continues from the checkpoint: stops after epoch 2
    assert result.stop_reason == "early_stop"
    assert [h["epoch"] for h in result.history] == [0, 1, 2]


def test_missing_metric_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="EarlyStop: metric 'Nope' is not in metrics_dict"):
        Trainer("es", tmp_path).train(model=make_model(), training_params=quiet_params(
            phase_callbacks=[EarlyStop(metric="Nope")]), train_loader=make_loader(), valid_loader=make_loader(16))


def test_by_name_in_phase_callbacks(tmp_path):
    result = Trainer("es", tmp_path).train(model=make_model(), training_params=quiet_params(
        max_epochs=2, phase_callbacks=[{"EarlyStop": {"patience": 3}}]), train_loader=make_loader(),
        valid_loader=make_loader(16))
    assert result.stop_reason == "completed"
