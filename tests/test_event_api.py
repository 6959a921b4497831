"""SPEC §7 "Context", "Event on_epoch_end" and "Optimizer control": what callbacks can see and change."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from conftest import Recorder, make_loader, make_model, only_run, quiet_params
from super_trainer import Callback, Trainer
from super_trainer.checkpoint import read_checkpoint


def train(tmp_path, callbacks, name="api", loader=None, **overrides):
    params = quiet_params(phase_callbacks=list(callbacks), **overrides)
    return Trainer(name, tmp_path).train(model=make_model(), training_params=params,
                                         train_loader=loader or make_loader(48, 8), valid_loader=make_loader(16, 8))


def test_context_counters(tmp_path):
    seen = {}

    class Look(Callback):
        def on_training_start(self, context):
            seen["start"] = (context.max_epochs, context.steps_per_epoch, context.total_steps, context.batches_seen,
                             context.rank, context.world_size)

        def on_train_batch_end(self, context):
            seen.setdefault("batches", []).append(context.batches_seen)

        def on_validation_end_best_epoch(self, context):
            seen.setdefault("best", []).append((context.best_epoch, context.epoch))

    train(tmp_path, [Look()], max_epochs=2, batch_accumulate=2)
    assert seen["start"] == (2, 3, 6, 0, 0, 1)  # 6 batches of 8, accumulate 2: 3 steps per epoch
    assert seen["batches"] == list(range(1, 13))
    assert all(best == epoch for best, epoch in seen["best"])


def test_on_epoch_end_state_is_saved_in_that_epochs_checkpoint(tmp_path):
    class Tally(Callback):
        state_key = "Tally"

        def __init__(self):
            self.ends = 0

        def on_epoch_end(self, context):
            self.ends += 1

        def state_dict(self):
            return {"ends": self.ends}

        def load_state_dict(self, state):
            self.ends = state["ends"]

    tally = Tally()
    train(tmp_path, [tally], max_epochs=3)
    assert tally.ends == 3
    assert read_checkpoint(only_run(tmp_path / "api") / "ckpt_latest.pth")["callbacks"]["Tally"] == {"ends": 3}


def test_a_new_criterion_serves_training_and_validation_from_the_next_batch(tmp_path):
    class ZeroLoss(nn.Module):
        def forward(self, preds, target):
            return (preds * 0.0).sum()

    class Switch(Callback):
        def on_train_loader_start(self, context):
            if context.epoch == 1:
                context.criterion = ZeroLoss()

    result = train(tmp_path, [Switch()], max_epochs=2)
    first, second = result.history
    assert first["train/CrossEntropyLoss"] > 0.1 and first["valid/CrossEntropyLoss"] > 0.1
    assert second["train/CrossEntropyLoss"] == 0.0 and second["valid/CrossEntropyLoss"] == 0.0


def test_a_new_train_loader_is_used_from_the_next_epoch(tmp_path):
    recorder = Recorder()

    class Grow(Callback):
        def on_train_batch_end(self, context):
            if context.epoch == 0 and context.batch_idx == 0:
                context.train_loader = make_loader(16, 8)  # 2 batches instead of 6

    # the schedule follows the new length (SPEC §8 "Per-epoch settings") and says so
    with pytest.warns(UserWarning, match=r"epoch 1: the run is now 2 epochs of 2 optimizer steps \(was 2 of 6\); the "
                                         r"horizons of CosineLRSchedule"):
        train(tmp_path, [Grow(), recorder], max_epochs=2, lr_mode="cosine")
    starts = [epoch for name, epoch, *_ in recorder.detail if name == "on_train_batch_start"]
    assert starts == [0] * 6 + [1] * 2


@pytest.mark.parametrize("field", ["net", "optimizer"])
def test_replacing_net_or_optimizer_is_refused(tmp_path, field):
    class Replace(Callback):
        def on_training_start(self, context):
            setattr(context, field, make_model() if field == "net" else torch.optim.SGD(make_model().parameters(), 0.1))

    with pytest.raises(AttributeError, match=f"context.{field} cannot be replaced during training"):
        train(tmp_path, [Replace()], max_epochs=1)


def test_skip_step_skips_the_step_and_everything_that_counts_it(tmp_path):
    recorder = Recorder()

    class SkipOdd(Callback):
        def __init__(self):
            self.calls = 0

        def on_train_batch_gradient_step_start(self, context):
            context.skip_step = self.calls % 2 == 1
            self.calls += 1

    model = make_model()
    before = [p.detach().clone() for p in model.parameters()]
    result = Trainer("skip", tmp_path).train(
        model=model, training_params=quiet_params(max_epochs=1, lr_mode="cosine", phase_callbacks=[SkipOdd(), recorder]),
        train_loader=make_loader(64, 8), valid_loader=None)
    steps = [g for name, _, _, g in recorder.detail if name == "on_train_batch_gradient_step_end"]
    assert steps == [1, 2, 3, 4]  # 8 stepping batches, every other one skipped
    assert read_checkpoint(only_run(tmp_path / "skip") / "ckpt_latest.pth")["global_step"] == 4
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert result.stop_reason == "completed"


def test_skip_step_really_leaves_the_weights_alone(tmp_path):
    class SkipAll(Callback):
        def on_train_batch_gradient_step_start(self, context):
            context.skip_step = True

    model = make_model()
    before = [p.detach().clone() for p in model.parameters()]
    Trainer("skipall", tmp_path).train(model=model, training_params=quiet_params(max_epochs=1,
                                                                                 phase_callbacks=[SkipAll()]),
                                       train_loader=make_loader(), valid_loader=None)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert all(p.grad is None for p in model.parameters())


def test_lbfgs_gets_a_closure_and_converges(tmp_path):
    torch.manual_seed(0)
    x = torch.randn(64, 3)
    y = x @ torch.tensor([[1.5], [-2.0], [0.5]]) + 0.3
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=64)
    model = nn.Linear(3, 1)
    optimizer = torch.optim.LBFGS(model.parameters(), lr=1.0, max_iter=20, line_search_fn="strong_wolfe")
    result = Trainer("lbfgs", tmp_path).train(
        model=model, training_params=quiet_params(max_epochs=3, optimizer=optimizer, initial_lr=None, loss="MSELoss",
                                                  valid_metrics_list=[], metric_to_watch="MSELoss",
                                                  greater_metric_to_watch_is_better=False),
        train_loader=loader, valid_loader=loader)
    assert result.history[-1]["valid/MSELoss"] < 1e-8
    assert torch.allclose(model.weight, torch.tensor([[1.5, -2.0, 0.5]]), atol=1e-4)


def test_closure_recomputes_only_after_the_weights_changed(tmp_path):
    forwards = []

    class Counting(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = make_model()

        def forward(self, x):
            forwards.append(1)
            return self.inner(x)

    class TwoPass(torch.optim.SGD):
        """A SAM-like optimizer from "any source": calls the closure first, then after moving the weights."""
        __module__ = "user_code"

        def step(self, closure=None):
            closure()  # weights unchanged: the batch's loss, no recompute
            with torch.no_grad():
                for group in self.param_groups:
                    for p in group["params"]:
                        p.data.add_(0.01)  # through .data: invisible to version counters
            closure()  # weights changed: recompute
            return super().step()

    model = Counting()
    optimizer = TwoPass(model.parameters(), lr=0.1)
    Trainer("closure", tmp_path).train(model=model, training_params=quiet_params(max_epochs=1, optimizer=optimizer,
                                                                                 initial_lr=None),
                                       train_loader=make_loader(32, 8), valid_loader=None)
    assert len(forwards) == 4 * 2  # one forward per batch + one recompute per step, not two


def test_closure_optimizers_refuse_accumulation():
    model = make_model()
    with pytest.raises(ValueError, match="batch_accumulate"):
        Trainer("x", "unused").train(model=model, training_params=quiet_params(
            optimizer=torch.optim.LBFGS(model.parameters()), initial_lr=None, batch_accumulate=2),
            train_loader=make_loader())


def test_sg_model_hooks_build_and_update_the_param_groups(tmp_path):
    calls = []

    class TwoSpeed(nn.Module):
        """A backbone at a tenth of the head's lr, the way SG models use these hooks."""

        def __init__(self):
            super().__init__()
            self.backbone, self.head = nn.Linear(8, 16), nn.Linear(16, 3)

        def forward(self, x):
            return self.head(torch.relu(self.backbone(x)))

        def initialize_param_groups(self, lr, training_params):
            return [{"named_params": self.backbone.named_parameters(), "lr": lr * 0.1, "role": "backbone"},
                    {"named_params": self.head.named_parameters(), "lr": lr, "role": "head"}]

        def update_param_groups(self, param_groups, lr, epoch, iter, training_params, total_batch):
            calls.append((epoch, iter, total_batch, lr))
            for group in param_groups:
                group["lr"] = lr * (0.1 if group["role"] == "backbone" else 1.0)
            return param_groups

    model = TwoSpeed()
    params = quiet_params(max_epochs=2, initial_lr=0.1, lr_mode="cosine", phase_callbacks=[],
                          valid_metrics_list=["Accuracy"])
    Trainer("hooks", tmp_path).train(model=model, training_params=params, train_loader=make_loader(32, 8),
                                     valid_loader=make_loader(16, 8))
    optimizer = read_checkpoint(only_run(tmp_path / "hooks") / "ckpt_latest.pth")["optimizer_state_dict"]
    backbone, head = optimizer["param_groups"]
    assert (backbone["role"], head["role"]) == ("backbone", "head")
    assert len(calls) == 8 and calls[0][:3] == (0, 0, 4)  # once per step: epoch, batch, steps per epoch
    last_lr = calls[-1][3]
    assert backbone["lr"] == pytest.approx(0.1 * last_lr) and head["lr"] == pytest.approx(last_lr)
