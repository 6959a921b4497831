"""The context contract: every attribute the trainer writes is a declared field, locked fields refuse replacement
during training, honoured fields take effect, and the Trainer keeps no state between calls."""
from __future__ import annotations

import copy

import pytest
import torch

from conftest import make_loader, make_model, quiet_params
from super_trainer import Callback, PhaseContext, Trainer
from super_trainer.context import FIELD_DOCS, HONOURED, LOCKED, OUTPUTS


class Capture(Callback):
    """Keeps the context it saw last, and what it saw at on_training_end."""

    def __init__(self) -> None:
        self.context = None

    def on_training_end(self, context):
        self.context = context


def _full_run(tmp_path, **overrides):
    capture = Capture()
    params = quiet_params(
        max_epochs=2, sg_logger="tensorboard", ema=True, lr_mode="cosine", lr_warmup_epochs=1,
        clip_grad_norm=1.0, save_ckpt_every_n_steps=3, average_best_models=True, train_metrics_list=["Accuracy"],
        phase_callbacks=[capture], **overrides)
    trainer = Trainer("ctx", ckpt_root_dir=tmp_path, device="cpu")
    trainer.train(model=make_model(), training_params=params, train_loader=make_loader(n=48),
                  valid_loader=make_loader(n=16, seed=1), test_loaders={"test": make_loader(n=16, seed=2)})
    return capture.context


def test_every_attribute_the_trainer_writes_is_declared(tmp_path):
    context = _full_run(tmp_path)
    internal = {"_trainer_owned", "_trainer_owned_locked"}
    written = set(vars(context)) - internal
    assert written <= set(FIELD_DOCS), sorted(written - set(FIELD_DOCS))
    owned = set(vars(context)["_trainer_owned"])
    assert owned == set(LOCKED)  # locked fields are held apart, so a plain write cannot shadow them
    assert context.best_metric is not None and len(context.history) == 2 and context.test_metrics["test"]


def test_the_three_kinds_of_field_do_not_overlap_and_each_is_documented():
    kinds = [set(HONOURED), set(LOCKED), set(OUTPUTS)]
    assert not (kinds[0] & kinds[1]) and not (kinds[0] & kinds[2]) and not (kinds[1] & kinds[2])
    assert all(len(doc) > 10 for doc in FIELD_DOCS.values())
    spec_fields = ("epoch batch_idx optimizer metrics_dict inputs preds target loss loss_log_items criterion device "
                   "stop_training experiment_name ckpt_dir net sg_logger train_loader valid_loader test_loader "
                   "training_params checkpoint_params architecture arch_params metric_to_watch valid_metrics "
                   "train_metrics ema_model lr_warmup_epochs additional_batch_items global_step best_metric exception "
                   "max_epochs steps_per_epoch total_steps batches_seen best_epoch rank world_size").split()
    assert set(spec_fields) <= set(FIELD_DOCS)


class WriteAt(Callback):
    """Writes ``field`` at on_train_batch_start and records the error."""

    def __init__(self, field):
        self.field, self.error = field, None

    def on_train_batch_start(self, context):
        current = getattr(context, self.field)
        replacement = copy.copy(current) if current is not None and not isinstance(current, (int, float)) else 12345
        if replacement is current:
            replacement = object()
        try:
            setattr(context, self.field, replacement)
        except AttributeError as err:
            self.error = err
        context.stop_training = True


@pytest.mark.parametrize("field", sorted(LOCKED))
def test_replacing_a_locked_field_during_training_raises_naming_it(tmp_path, field):
    writer = WriteAt(field)
    Trainer("locked", ckpt_root_dir=tmp_path, device="cpu").train(
        model=make_model(), training_params=quiet_params(max_epochs=1, phase_callbacks=[writer], save_model=False),
        train_loader=make_loader(n=16), valid_loader=None)
    assert writer.error is not None, f"writing context.{field} was silently accepted"
    assert f"context.{field}" in str(writer.error)


def test_locked_fields_are_writable_outside_training():
    context = PhaseContext()
    context.epoch, context.ckpt_dir, context.net = 3, "somewhere", torch.nn.Linear(1, 1)
    assert (context.epoch, context.ckpt_dir) == (3, "somewhere")
    context.update_context(my_own_field=1)  # callbacks may add their own attributes
    assert context.my_own_field == 1


class Extend(Callback):
    def on_train_loader_start(self, context):
        if context.epoch == 0:
            context.max_epochs = 3


def test_raising_max_epochs_in_a_callback_extends_the_run(tmp_path):
    result = Trainer("extend", ckpt_root_dir=tmp_path, device="cpu").train(
        model=make_model(), training_params=quiet_params(max_epochs=1, phase_callbacks=[Extend()]),
        train_loader=make_loader(n=16), valid_loader=make_loader(n=16, seed=1))
    assert [row["epoch"] for row in result.history] == [0, 1, 2]


def test_the_trainer_keeps_no_state_between_calls(tmp_path):
    trainer = Trainer("stateless", ckpt_root_dir=tmp_path, device="cpu")
    before = {k: copy.copy(v) for k, v in vars(trainer).items()}

    class Peek(Callback):
        def on_train_batch_end(self, context):
            assert {k: v for k, v in vars(trainer).items()} == before

    for _ in range(2):
        trainer.train(model=make_model(), training_params=quiet_params(max_epochs=1, phase_callbacks=[Peek()]),
                      train_loader=make_loader(n=16), valid_loader=None)
    assert vars(trainer) == before
