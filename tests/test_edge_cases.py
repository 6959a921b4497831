"""Behaviours around the edges: model averaging, loaders without len(), log contents, history lr."""
from __future__ import annotations

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from conftest import NoLen, make_loader, make_model, quiet_params
from super_trainer import Callback, Phase, Trainer
from super_trainer.checkpoint import load_checkpoint_to_model


def test_average_best_models_averages_the_best_epochs(tmp_path):
    snapshots = {}

    class Snap(Callback):
        def on_validation_loader_end(self, context):
            snapshots[context.epoch] = (context.metrics_dict["CrossEntropyLoss"],
                                        {k: v.clone() for k, v in context.net.state_dict().items()})

    Trainer("avg", tmp_path).train(
        model=make_model(), training_params=quiet_params(max_epochs=4, average_best_models=True, phase_callbacks=[Snap()],
                                                         metric_to_watch="CrossEntropyLoss",
                                                         greater_metric_to_watch_is_better=False),
        train_loader=make_loader(), valid_loader=make_loader(16))
    averaged = make_model(seed=7)
    state = load_checkpoint_to_model(averaged, tmp_path / "avg" / "average_model.pth")
    assert sorted(state["averaged_epochs"]) == [0, 1, 2, 3]  # fewer than 10 epochs: all are kept
    for key, value in averaged.state_dict().items():
        expected = torch.stack([w[key] for _, w in snapshots.values()]).mean(0)
        torch.testing.assert_close(value, expected)


def test_average_best_models_keeps_only_the_best(tmp_path):
    from super_trainer.callbacks.average_models import AverageBestModels
    from super_trainer.callbacks.base import PhaseContext

    net = make_model()
    callback = AverageBestModels("acc", greater_is_better=True, max_models=2)
    context = PhaseContext(ckpt_dir=tmp_path, net=net)
    callback.on_training_start(context)
    for epoch, acc in enumerate([0.5, 0.9, 0.7, 0.6]):
        with torch.no_grad():
            for p in net.parameters():
                p.fill_(float(epoch))
        context.update_context(epoch=epoch, metrics_dict={"Acc": acc})
        callback.on_validation_loader_end(context)
    assert [k["epoch"] for k in callback.kept] == [1, 2]
    averaged = torch.load(tmp_path / "average_model.pth", weights_only=True)["net"]
    assert torch.all(averaged["0.weight"] == 1.5)  # mean of epochs 1 and 2


def test_loader_without_len_needs_max_train_batches_for_step_schedules(tmp_path):
    loader = NoLen(make_loader(64, 8))
    with pytest.raises(ValueError, match="max_train_batches: lr_mode 'cosine' need the number of batches"):
        Trainer("nolen", tmp_path).train(model=make_model(), training_params=quiet_params(lr_mode="cosine"),
                                         train_loader=loader)
    steps = []

    class Count(Callback):
        def on_train_batch_gradient_step_end(self, context):
            steps.append((context.epoch, context.batch_idx))

    Trainer("nolen", tmp_path).train(model=make_model(), training_params=quiet_params(
        lr_mode="cosine", max_train_batches=5, batch_accumulate=2, phase_callbacks=[Count()]), train_loader=loader)
    # 5 batches per epoch with windows of 2: steps after batches 1, 3 and the last one (4)
    assert steps == [(0, 1), (0, 3), (0, 4), (1, 1), (1, 3), (1, 4)]


def test_torch_scheduler_phase_as_member(tmp_path):
    lrs = []

    class Spy(Callback):
        def on_train_loader_end(self, context):
            lrs.append(context.epoch_lrs[0])

    Trainer("sched", tmp_path).train(model=make_model(), training_params=quiet_params(
        max_epochs=3, lr_mode={"ExponentialLR": {"gamma": 0.5, "phase": Phase.TRAIN_EPOCH_END}}, phase_callbacks=[Spy()]),
        train_loader=make_loader(), valid_loader=None)
    assert lrs == pytest.approx([0.1, 0.05, 0.025])


def test_history_and_tensorboard_lr_are_the_epochs_own(tmp_path):
    result = Trainer("steplr", tmp_path).train(model=make_model(), training_params=quiet_params(
        max_epochs=3, lr_mode="step", lr_updates=[0, 1], lr_decay_factor=0.5, sg_logger="tensorboard"),
        train_loader=make_loader(), valid_loader=None)
    assert [h["lr"] for h in result.history] == pytest.approx([0.1, 0.05, 0.025])
    events = EventAccumulator(str(tmp_path / "steplr"))
    events.Reload()
    assert [e.value for e in events.Scalars("LR/default")] == pytest.approx([0.1, 0.05, 0.025])


def test_log_has_the_stop_reason_and_early_callback_scalars(tmp_path):
    class Early(Callback):
        priority = "VERY_HIGH"

        def on_training_start(self, context):
            context.sg_logger.add_scalar("Setup/params", 123, 0)

        def on_train_loader_end(self, context):
            context.stop_training = True

    Trainer("log", tmp_path).train(model=make_model(), training_params=quiet_params(
        max_epochs=3, sg_logger="tensorboard", phase_callbacks=[Early()]),
        train_loader=make_loader(), valid_loader=make_loader(16))
    text = (tmp_path / "log" / "experiment.log").read_text()
    assert "Setup/params=123" in text
    assert text.strip().splitlines()[-1].endswith("training ended: stopped_by_callback")
    events = EventAccumulator(str(tmp_path / "log"))
    events.Reload()
    assert [e.value for e in events.Scalars("Setup/params")] == [123.0]


@pytest.mark.parametrize("overrides, words", [
    ({"cosine_final_lr_ratio": None}, "cosine_final_lr_ratio: must be a number"),
    ({"phase_callbacks": ["EMAUpdate"]}, "phase_callbacks: cannot build 'EMAUpdate'"),
    ({"lr_mode": {"StepLR": {"step_size": 1, "phase": "EVERY_BATCH"}}}, "unknown phase 'EVERY_BATCH'"),
])
def test_more_bad_params(tmp_path, overrides, words):
    with pytest.raises(ValueError, match=words):
        Trainer("bad", tmp_path).train(model=make_model(), training_params=quiet_params(**overrides),
                                       train_loader=make_loader())
