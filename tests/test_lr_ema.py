"""LR schedules follow the SPEC §4 formulas step by step; EMA follows its decay formula."""
from __future__ import annotations

import copy
import math

import pytest
import torch

from conftest import make_loader, make_model, only_run, quiet_params
from super_trainer import Callback, Trainer

L, M = 4, 5  # optimizer steps per epoch (32 samples / batch 8), epochs


class LRSpy(Callback):
    """The lr of each param group as each optimizer step is about to use it."""

    def __init__(self):
        self.lrs = []

    def on_train_batch_gradient_step_start(self, context):
        self.lrs.append([g["lr"] for g in context.optimizer.param_groups])


def used_lrs(tmp_path, **overrides):
    spy = LRSpy()
    Trainer("lr", tmp_path).train(model=make_model(), training_params=quiet_params(max_epochs=M, phase_callbacks=[spy], **overrides),
                                  train_loader=make_loader(32, 8), valid_loader=None)
    return spy.lrs


def simulate(formula, lr0=0.1, W=0, S=0, C=0, w0=None, epoch_end=None, batch_warmup_steps=0):
    """The lr each step uses, written from the SPEC: step-based values apply from the next step."""
    used, current, g = [], lr0, 0
    for E in range(M):
        if W and E <= W and not batch_warmup_steps:
            start = lr0 / (W + 1) if w0 is None else w0
            current = start + E * (lr0 - start) / W
        for b in range(L):
            if g < batch_warmup_steps:
                n = batch_warmup_steps
                start = lr0 / (n + 1) if w0 is None else w0
                current = start + g * (lr0 - start) / (n - 1)
            used.append(current)
            g += 1
            if formula and W <= E < M - C and g >= S:
                current = formula(E, b)
        if epoch_end and E >= W:
            current = epoch_end(E)
    return used


def check(actual, expected):
    assert len(actual) == len(expected) == L * M
    assert [a[0] for a in actual] == pytest.approx(expected, rel=1e-12, abs=1e-15)


def test_constant_lr(tmp_path):
    check(used_lrs(tmp_path), [0.1] * (L * M))


def test_cosine_with_epoch_warmup(tmp_path):
    W, r = 1, 0.01

    def cosine(E, b):
        it, T = L * (E - W) + b, L * (M - W)
        return 0.1 * (0.5 * (1 + math.cos(math.pi * it / (T + 1))) * (1 - r) + r)

    check(used_lrs(tmp_path, lr_mode="cosine", lr_warmup_epochs=W), simulate(cosine, W=W))


def test_cosine_long_name_with_batch_warmup_steps(tmp_path):
    S, r = 5, 0.1

    def cosine(E, b):
        it, T = max(0, L * E + b - S), L * M - S
        return 0.1 * (0.5 * (1 + math.cos(math.pi * it / (T + 1))) * (1 - r) + r)

    actual = used_lrs(tmp_path, lr_mode="CosineLRScheduler", lr_warmup_steps=S, warmup_mode="linear_batch_step",
                      cosine_final_lr_ratio=r)
    expected = simulate(cosine, S=S, batch_warmup_steps=S)
    check(actual, expected)
    assert expected[0] == pytest.approx(0.1 / 6) and expected[S - 1] == pytest.approx(0.1)


def test_poly_with_cooldown(tmp_path):
    C = 1

    def poly(E, b):
        return 0.1 * (1 - (L * E + b) / (L * (M - C))) ** 0.9

    check(used_lrs(tmp_path, lr_mode="poly", lr_cooldown_epochs=C), simulate(poly, C=C))


def test_exp(tmp_path):
    f = 0.5
    check(used_lrs(tmp_path, lr_mode="exp", lr_decay_factor=f), simulate(lambda E, b: 0.1 * f ** ((L * E + b) / L)))


def test_step_with_epoch_warmup_and_explicit_w0(tmp_path):
    W, f, updates = 1, 0.1, [2, 3]
    actual = used_lrs(tmp_path, lr_mode="step", lr_updates=updates, lr_decay_factor=f, lr_warmup_epochs=W,
                      warmup_initial_lr=0.02)
    expected = simulate(None, W=W, w0=0.02, epoch_end=lambda E: 0.1 * f ** sum(u <= E for u in updates))
    check(actual, expected)
    assert expected[L * 3] == pytest.approx(0.01)  # update 2 takes effect from epoch 3


def test_function_schedule(tmp_path):
    calls = []

    def schedule(initial_lr, epoch, iter, max_epoch, iters_per_epoch):
        calls.append((epoch, iter, max_epoch, iters_per_epoch))
        return initial_lr / (1 + epoch * iters_per_epoch + iter)

    actual = used_lrs(tmp_path, lr_mode="function", lr_schedule_function=schedule)
    check(actual, simulate(lambda E, b: 0.1 / (1 + E * L + b)))
    assert calls[0] == (0, 0, M, L) and calls[-1] == (M - 1, L - 1, M, L)


def test_param_groups_keep_their_ratio(tmp_path):
    actual = used_lrs(tmp_path, lr_mode="cosine", initial_lr={"0.": 0.02, "default": 0.1})
    for small, big in actual:
        assert small == pytest.approx(big / 5)


def test_torch_scheduler_by_name(tmp_path):
    actual = used_lrs(tmp_path, lr_mode={"StepLR": {"step_size": 2, "gamma": 0.5, "phase": "TRAIN_EPOCH_END"}})
    check(actual, [0.1 * 0.5 ** (E // 2) for E in range(M) for _ in range(L)])
    from super_trainer.checkpoint import read_checkpoint

    state = read_checkpoint(only_run(tmp_path / "lr") / "ckpt_latest.pth")["lr_scheduler_state"]
    assert state["TorchSchedulerCallback[StepLR]"]["last_epoch"] == M


def test_reduce_on_plateau_needs_metric_name(tmp_path):
    with pytest.raises(ValueError, match="metric_name"):
        used_lrs(tmp_path, lr_mode={"ReduceLROnPlateau": {"patience": 0}})


@pytest.mark.parametrize("decay_type", ["constant", "threshold", "exp"])
def test_ema_follows_the_decay_formula(tmp_path, decay_type):
    decay, beta = 0.8, 15.0
    model = make_model()
    reference = {"ema": None}

    class Shadow(Callback):
        """Keeps an independent EMA of the weights, computed from the SPEC formula after each step."""

        priority = "VERY_LOW"

        def on_training_start(self, context):
            reference["ema"] = {k: v.clone().double() for k, v in context.net.state_dict().items()}

        def on_train_batch_gradient_step_end(self, context):
            step, total = context.global_step, L * 2
            d = {"constant": decay, "threshold": min(decay, (1 + step) / (10 + step)),
                 "exp": decay * (1 - math.exp(-beta * step / total))}[decay_type]
            for k, v in context.net.state_dict().items():
                reference["ema"][k] = d * reference["ema"][k] + (1 - d) * v.double()

    seen = {}

    class ValidModel(Callback):
        def on_validation_loader_end(self, context):
            seen["valid_loss"] = context.metrics_dict["CrossEntropyLoss"]

    Trainer("ema", tmp_path).train(model=model, training_params=quiet_params(
        max_epochs=2, ema=True, ema_params={"decay": decay, "decay_type": decay_type, "beta": beta},
        phase_callbacks=[Shadow(), ValidModel()]), train_loader=make_loader(32, 8), valid_loader=make_loader(16, 8))
    from super_trainer.checkpoint import read_checkpoint

    ema = read_checkpoint(only_run(tmp_path / "ema") / "ckpt_latest.pth")["ema_net"]
    for key, value in reference["ema"].items():
        torch.testing.assert_close(ema[key].double(), value, atol=1e-6, rtol=0)
    # validation ran with the EMA weights, not the trained ones
    ema_model = copy.deepcopy(model)
    ema_model.load_state_dict(ema)
    loader = make_loader(16, 8)
    with torch.no_grad():
        losses = [torch.nn.functional.cross_entropy(ema_model(x), y).item() for x, y in loader]
    assert seen["valid_loss"] == pytest.approx(sum(losses) / len(losses), rel=1e-5)


def test_bf16_autocast_on_cpu_trains(tmp_path):
    dtypes = []

    class Look(Callback):
        def on_train_batch_loss_end(self, context):
            dtypes.append(context.preds.dtype)

    result = Trainer("amp", tmp_path).train(model=make_model(), training_params=quiet_params(
        max_epochs=2, mixed_precision=True, phase_callbacks=[Look()]), train_loader=make_loader(), valid_loader=make_loader(16))
    assert set(dtypes) == {torch.bfloat16}
    assert math.isfinite(result.history[-1]["train/CrossEntropyLoss"])


def test_clip_grad_norm_bounds_the_gradient(tmp_path):
    norms = []

    class Norm(Callback):
        priority = "VERY_LOW"  # after the clipping callback

        def on_train_batch_gradient_step_start(self, context):
            grads = [p.grad for p in context.net.parameters() if p.grad is not None]
            norms.append(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])).item())

    Trainer("clip", tmp_path).train(model=make_model(), training_params=quiet_params(
        max_epochs=1, initial_lr=1.0, clip_grad_norm=0.01, phase_callbacks=[Norm()]),
        train_loader=make_loader(), valid_loader=None)
    assert norms and max(norms) <= 0.01 + 1e-6
