"""SPEC §8 "Per-epoch settings": batch_accumulate, the train loader and max_epochs written by a callback take effect
for the epoch when written at on_train_loader_start, from the next epoch when written elsewhere; the batch count,
steps per epoch, total_steps and schedule horizons follow, with a warning when a horizon changes."""
from __future__ import annotations

import math
import warnings
from typing import List

import pytest
import torch
import torch.nn.functional as F

from conftest import make_loader, make_model, quiet_params
from super_trainer import Callback, Trainer

SGD_DEFAULTS = {"momentum": 0.9, "weight_decay": 1e-4}


def batches(n: int, seed: int = 0) -> List:
    return [(x, y) for x, y in make_loader(n=8 * n, batch_size=8, seed=seed)]


def hand_loop(model, epochs):
    """``epochs``: one (batches, batch_accumulate) per epoch."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, **SGD_DEFAULTS)
    for data, accumulate in epochs:
        for index, (x, y) in enumerate(data):
            window = min(accumulate, len(data) - (index - index % accumulate))
            loss = F.cross_entropy(model(x), y)
            (loss / window if window > 1 else loss).backward()
            if (index + 1) % accumulate == 0 or index + 1 == len(data):
                optimizer.step()
                optimizer.zero_grad()
    return model


class Watch(Callback):
    """Records, per epoch, the steps taken, the steps_per_epoch and total_steps seen at the first batch, and whether
    any gradient was left over when the epoch's first batch started."""

    priority = 90  # after the callbacks that change settings

    def __init__(self):
        self.steps, self.seen, self.leftover = {}, {}, {}

    def on_train_batch_start(self, context):
        if context.batch_idx == 0:
            self.seen[context.epoch] = (context.steps_per_epoch, context.total_steps, context.max_epochs)
            self.leftover[context.epoch] = any(p.grad is not None for p in context.net.parameters())

    def on_train_batch_gradient_step_end(self, context):
        self.steps[context.epoch] = self.steps.get(context.epoch, 0) + 1


class SetAt(Callback):
    """At ``event`` of epoch ``epoch`` (first batch for batch events), run ``change(context)``."""

    def __init__(self, event, epoch, change):
        self.epoch, self.change = epoch, change
        setattr(self, event, self._maybe)

    def _maybe(self, context):
        if context.epoch == self.epoch and context.batch_idx in (None, 0):
            self.change(context)


def run(tmp_path, changer, data, max_epochs=2, **params):
    model, watch = make_model(), Watch()
    result = Trainer("settings", tmp_path, device="cpu").train(
        model=model, training_params=quiet_params(max_epochs=max_epochs, phase_callbacks=[changer, watch],
                                                  silent_mode=True, **params),
        train_loader=data, valid_loader=batches(1, seed=5))
    return model, watch, result


def assert_same(a, b):
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(x, y), name


def test_batch_accumulate_written_at_loader_start_applies_to_that_epoch(tmp_path):
    data = batches(8)
    change = SetAt("on_train_loader_start", 1, lambda c: c.training_params.__setitem__("batch_accumulate", 4))
    model, watch, _ = run(tmp_path, change, data)
    assert watch.steps == {0: 8, 1: 2} and watch.seen[1][:2] == (2, 4)
    assert_same(model, hand_loop(make_model(), [(data, 1), (data, 4)]))


def test_batch_accumulate_written_during_a_batch_applies_from_the_next_epoch(tmp_path):
    data = batches(8)
    change = SetAt("on_train_batch_end", 0, lambda c: c.training_params.__setitem__("batch_accumulate", 2))
    model, watch, _ = run(tmp_path, change, data, max_epochs=3)
    assert watch.steps == {0: 8, 1: 4, 2: 4}
    assert_same(model, hand_loop(make_model(), [(data, 1), (data, 2), (data, 2)]))


@pytest.mark.parametrize("n_new", [5, 12])
def test_a_train_loader_replaced_at_loader_start_runs_whole_and_leaks_no_gradient(tmp_path, n_new):
    data, new = batches(8), batches(n_new, seed=3)
    change = SetAt("on_train_loader_start", 1, lambda c: setattr(c, "train_loader", new))
    model, watch, result = run(tmp_path, change, data, max_epochs=3, batch_accumulate=2)
    assert watch.steps == {0: 4, 1: (n_new + 1) // 2, 2: (n_new + 1) // 2}  # not cut to the old loader's 8 batches
    assert watch.seen[1][0] == (n_new + 1) // 2 and not any(watch.leftover.values())
    assert_same(model, hand_loop(make_model(), [(data, 2), (new, 2), (new, 2)]))


class Lying:
    """A loader whose len() says more batches than it yields."""

    def __init__(self, data, claimed):
        self.data, self.claimed = data, claimed

    def __len__(self):
        return self.claimed

    def __iter__(self):
        return iter(self.data)


def test_a_loader_shorter_than_its_len_drops_its_unfinished_window_with_a_warning(tmp_path):
    data = batches(5)
    with pytest.warns(UserWarning, match="ended after 5 batches, but its len\\(\\) said 8"):
        model, watch, _ = run(tmp_path, Callback(), Lying(data, 8), batch_accumulate=2)
    assert not any(watch.leftover.values())  # the 5th batch's gradient did not reach the next epoch
    assert watch.steps == {0: 2, 1: 2}


@pytest.mark.parametrize("where", ["context", "training_params"])
def test_max_epochs_written_at_loader_start_extends_the_run_and_the_schedule(tmp_path, where):
    def extend(context):
        if where == "context":
            context.max_epochs += 1
        else:
            context.training_params["max_epochs"] += 1

    data = batches(4)
    with pytest.warns(UserWarning, match=r"epoch 1: the run is now 3 epochs of 4 optimizer steps \(was 2 of 4\); the "
                                         r"horizons of CosineLRSchedule, EMAUpdate were recomputed"):
        _, watch, result = run(tmp_path, SetAt("on_train_loader_start", 1, extend), data, lr_mode="cosine", ema=True)
    assert [row["epoch"] for row in result.history] == [0, 1, 2]
    assert watch.seen[1] == (4, 12, 3) and watch.seen[0] == (4, 8, 2)
    assert [("valid/Accuracy" in row) for row in result.history] == [True, True, True]
    end = 0.1 * (0.5 * (1 + math.cos(math.pi * 11 / 13)) * 0.99 + 0.01)  # step 12 of 12, not of 8
    assert result.history[-1]["lr"] == pytest.approx(end, rel=1e-12)


def test_no_warning_when_nothing_follows_the_horizon(tmp_path):
    change = SetAt("on_train_loader_start", 1, lambda c: setattr(c, "max_epochs", 3))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _, _, result = run(tmp_path, change, batches(4))
    assert len(result.history) == 3


def test_bad_writes_are_named(tmp_path):
    with pytest.raises(ValueError, match="training_params.batch_accumulate: must be an int >= 1, got 0"):
        run(tmp_path, SetAt("on_train_loader_start", 1, lambda c: c.training_params.__setitem__("batch_accumulate", 0)),
            batches(4))
    with pytest.raises(ValueError, match="must be an int >= 1, got 'many'"):
        run(tmp_path, SetAt("on_train_loader_start", 1, lambda c: setattr(c, "max_epochs", "many")), batches(4))
