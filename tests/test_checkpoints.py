"""Checkpoint files, keys, atomic writes, clear errors and the loading helpers (SPEC §3)."""
from __future__ import annotations

import pickle

import pytest
import torch
import torch.nn as nn

from conftest import make_loader, make_model, quiet_params
from super_trainer import CheckpointError, Trainer, load_checkpoint_to_model, transfer_weights
from super_trainer.checkpoint import REQUIRED_KEYS, read_checkpoint, save_checkpoint


def train(tmp_path, name="exp", **overrides):
    model = make_model()
    result = Trainer(name, tmp_path).train(model=model, training_params=quiet_params(**overrides),
                                           train_loader=make_loader(), valid_loader=make_loader(16))
    return model, result


def test_files_and_keys(tmp_path):
    model, result = train(tmp_path, max_epochs=3, save_ckpt_epoch_list=[2], ema=True)
    exp = tmp_path / "exp"
    names = {p.name for p in exp.iterdir()}
    assert {"ckpt_latest.pth", "ckpt_best.pth", "ckpt_epoch_2.pth", "training_params.yaml", "experiment.log"} <= names
    assert "ckpt_epoch_1.pth" not in names and "ckpt_epoch_3.pth" not in names
    assert not [n for n in names if n.endswith(".tmp")]
    latest = read_checkpoint(exp / "ckpt_latest.pth")
    assert set(REQUIRED_KEYS) <= set(latest)
    assert latest["epoch"] == 3
    assert latest["acc"] == result.metrics["Accuracy"]
    assert latest["best_metric"] == result.best_metric
    assert latest["ema_net"] is not None
    for key, value in model.state_dict().items():
        assert torch.equal(latest["net"][key], value)
    assert read_checkpoint(exp / "ckpt_epoch_2.pth")["epoch"] == 2
    best = read_checkpoint(exp / "ckpt_best.pth")
    assert best["epoch"] == result.best_epoch + 1
    for key, value in best["ema_net"].items():  # best holds the EMA weights as its net
        assert torch.equal(best["net"][key], value)
    assert result.best_ckpt_path == str(exp / "ckpt_best.pth")
    assert result.latest_ckpt_path == str(exp / "ckpt_latest.pth")


def test_best_is_written_only_on_strict_improvement(tmp_path):
    from test_events import ConstantMetric

    _, result = train(tmp_path, max_epochs=3, valid_metrics_list=[{"Const": ConstantMetric()}], metric_to_watch="const")
    assert result.best_epoch == 0
    assert read_checkpoint(tmp_path / "exp" / "ckpt_best.pth")["epoch"] == 1


def test_save_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "c.pth"
    save_checkpoint({"value": torch.ones(3)}, path)

    def broken_save(obj, f, *args, **kwargs):
        f.write(b"partial bytes")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint({"value": torch.zeros(3)}, path)
    monkeypatch.undo()
    assert torch.equal(torch.load(path, weights_only=True)["value"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == ["c.pth"]


def test_truncated_foreign_and_missing_checkpoints_name_the_path(tmp_path):
    _, _ = train(tmp_path, max_epochs=1)
    latest = tmp_path / "exp" / "ckpt_latest.pth"
    data = latest.read_bytes()
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(data[: len(data) // 2])
    foreign = tmp_path / "foreign.pth"
    torch.save({"state_dict": make_model().state_dict()}, foreign)
    missing = tmp_path / "nope.pth"
    for path, words in ((truncated, "is truncated"), (foreign, "not a super_trainer checkpoint"), (missing, "not found")):
        with pytest.raises(CheckpointError, match=words) as info:
            Trainer("other", tmp_path).train(model=make_model(), training_params=quiet_params(resume_path=str(path)),
                                             train_loader=make_loader(), valid_loader=make_loader(16))
        assert str(path) in str(info.value)
        assert isinstance(info.value, RuntimeError)
    assert not (tmp_path / "other" / "ckpt_latest.pth").exists()  # failed before any batch ran


def test_resume_without_checkpoint_warns_and_starts_fresh(tmp_path):
    with pytest.warns(UserWarning, match="from scratch"):
        _, result = train(tmp_path, max_epochs=1, resume=True)
    assert [h["epoch"] for h in result.history] == [0]


def test_weights_only_refuses_pickled_objects(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"net": make_model().state_dict(), "payload": pickle.PicklingError("x")}, path)
    with pytest.raises(CheckpointError, match="evil.pth"):
        load_checkpoint_to_model(make_model(), path)
    load_checkpoint_to_model(make_model(), path, weights_only=False)  # an explicit opt-out loads it


def test_load_checkpoint_to_model_and_ema(tmp_path):
    model, _ = train(tmp_path, max_epochs=2, ema=True)
    fresh = make_model(seed=99)
    load_checkpoint_to_model(fresh, tmp_path / "exp" / "ckpt_latest.pth")
    for key, value in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value)
    ema = make_model(seed=98)
    state = load_checkpoint_to_model(ema, tmp_path / "exp" / "ckpt_latest.pth", load_ema_as_net=True)
    for key, value in state["ema_net"].items():
        assert torch.equal(ema.state_dict()[key], value)
    with pytest.raises(CheckpointError, match="do not fit"):
        load_checkpoint_to_model(make_model(hidden=7), tmp_path / "exp" / "ckpt_latest.pth")
    first_layer = nn.Sequential(*list(make_model(seed=97))[:1])
    load_checkpoint_to_model(first_layer, tmp_path / "exp" / "ckpt_latest.pth", strict=False)
    assert torch.equal(first_layer[0].weight, model[0].weight)


def test_bare_state_dict_and_prefixes(tmp_path):
    source = make_model(seed=4)
    path = tmp_path / "bare.pth"
    torch.save({f"module.{k}": v for k, v in source.state_dict().items()}, path)  # as saved from a DDP model
    target = make_model(seed=5)
    load_checkpoint_to_model(target, path)
    for key, value in source.state_dict().items():
        assert torch.equal(target.state_dict()[key], value)


def test_transfer_weights_copies_matching_shapes_only():
    source = make_model(classes=3, seed=1)
    target = make_model(classes=5, seed=2)
    before_head = target[2].weight.clone()
    skipped = transfer_weights(target, source.state_dict())
    assert sorted(skipped) == ["2.bias", "2.weight"]
    assert torch.equal(target[0].weight, source[0].weight)
    assert torch.equal(target[2].weight, before_head)


def test_interrupt_leaves_a_loadable_latest(tmp_path):
    from super_trainer import Callback

    class CtrlC(Callback):
        def on_train_batch_end(self, context):
            if context.epoch == 1 and context.batch_idx == 2:
                raise KeyboardInterrupt

    ends = []

    class End(Callback):
        def on_training_end(self, context):
            ends.append(context.stop_reason)

    _, result = train(tmp_path, max_epochs=3, phase_callbacks=[CtrlC(), End()])
    assert result.stop_reason == "interrupted"
    assert ends == ["interrupted"]
    latest = read_checkpoint(tmp_path / "exp" / "ckpt_latest.pth")
    assert latest["epoch"] == 1  # the last completed epoch
    load_checkpoint_to_model(make_model(), tmp_path / "exp" / "ckpt_latest.pth")


def test_interrupt_in_first_epoch_still_leaves_latest(tmp_path):
    from super_trainer import Callback

    class CtrlC(Callback):
        def on_train_batch_start(self, context):
            raise KeyboardInterrupt

    _, result = train(tmp_path, max_epochs=2, phase_callbacks=[CtrlC()])
    assert result.stop_reason == "interrupted"
    assert read_checkpoint(tmp_path / "exp" / "ckpt_latest.pth")["epoch"] == 0


def test_interrupt_mid_batch_fires_batch_and_loader_end(tmp_path):
    from conftest import Recorder
    from super_trainer import Callback

    class CtrlC(Callback):
        def on_train_batch_loss_end(self, context):
            if context.epoch == 1 and context.batch_idx == 1:
                raise KeyboardInterrupt

    recorder = Recorder()
    _, result = train(tmp_path, max_epochs=3, phase_callbacks=[recorder, CtrlC()])
    assert result.stop_reason == "interrupted"
    assert recorder.events[-4:] == ["on_train_batch_loss_end", "on_train_batch_end", "on_train_loader_end",
                                    "on_training_end"]
    assert recorder.events.count("on_validation_loader_start") == 1
