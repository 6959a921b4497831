"""A finished run leaves nothing behind: once ``train()`` returns (or raises) and the caller drops the model, the
run's model, optimizer state and loss tensors are freed by reference counting alone, without waiting for Python's
cyclic garbage collector (which may not run for a long time, holding GPU memory in a notebook or a sweep)."""
from __future__ import annotations

import gc
import weakref

import pytest
import torch

from _any_models import GAN, GAN_OPTIMIZERS, gan_step, real_batches
from conftest import make_loader, make_model, quiet_params
from super_trainer import Callback, Trainer


class KeepWeakRefs(Callback):
    """At on_training_end: weak references to the run's optimizer(s), context and last loss (no strong ones)."""

    def __init__(self) -> None:
        self.refs = {}

    def on_training_end(self, context) -> None:
        optimizers = getattr(context, "optimizers", None) or {}
        self.refs = {"context": weakref.ref(context), "optimizer": weakref.ref(context.optimizer),
                     "loss": weakref.ref(context.loss),
                     **{f"optimizer {name}": weakref.ref(handle.optimizer) for name, handle in optimizers.items()}}


@pytest.fixture
def no_collector():
    """The cyclic garbage collector off (after clearing what earlier tests left): only reference counting frees.
    The first optimizer of a process imports torch._dynamo, whose import leaves cycles that hold the importing
    frames (and through them that run's locals) until a collection: done here, before the collector is off."""
    torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def _alive(refs):
    return sorted(name for name, ref in refs.items() if ref() is not None)


def test_a_default_run_is_freed_by_reference_counting(tmp_path, no_collector):
    keeper = KeepWeakRefs()
    model = make_model()
    params = quiet_params(max_epochs=2, ema=True, lr_warmup_epochs=1, lr_mode="CosineLRScheduler",
                          sg_logger="tensorboard", phase_callbacks=[keeper])
    Trainer("freed", tmp_path, device="cpu").train(model=model, training_params=params,
                                                  train_loader=make_loader(32, 8), valid_loader=make_loader(16, 8))
    refs = keeper.refs
    assert sorted(refs) == ["context", "loss", "optimizer", "optimizer default"]
    assert _alive(refs) == []  # gone when train() returned; the caller's model alone stays
    model_ref = weakref.ref(model)
    del model
    assert model_ref() is None


def test_a_train_step_with_several_optimizers_is_freed_by_reference_counting(tmp_path, no_collector):
    keeper = KeepWeakRefs()
    model = GAN()
    params = quiet_params(max_epochs=1, silent_mode=True, optimizer=GAN_OPTIMIZERS, train_step=gan_step,
                          valid_metrics_list=[], metric_to_watch="g_loss", phase_callbacks=[keeper])
    Trainer("gan_freed", tmp_path, device="cpu").train(model=model, training_params=params,
                                                      train_loader=real_batches())
    refs = dict(keeper.refs, model=weakref.ref(model))
    assert len(refs) == 6  # context, optimizer, loss, two named optimizers, model
    del model, keeper
    assert _alive(refs) == []


class Fails(Callback):
    def on_train_batch_end(self, context) -> None:
        if context.batch_idx == 1:
            raise RuntimeError("boom")


def test_a_failed_run_is_freed_once_its_exception_is_dropped(tmp_path, no_collector):
    keeper = KeepWeakRefs()
    model = make_model()
    params = quiet_params(max_epochs=1, phase_callbacks=[keeper, Fails()])
    with pytest.raises(RuntimeError, match="boom") as caught:
        Trainer("failed", tmp_path, device="cpu").train(model=model, training_params=params,
                                                       train_loader=make_loader(32, 8))
    refs = dict(keeper.refs, model=weakref.ref(model))
    del model, keeper, caught
    assert _alive(refs) == []
