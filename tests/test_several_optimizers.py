"""SPEC §8 "Several optimizers" and "Optimizer lifecycle events": a GAN's two models and two optimizers against a
hand-written loop, its events, its checkpoints and a bit-exact resume; param groups added by callbacks."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn

from _any_models import GAN, GAN_OPTIMIZERS, gan_losses, gan_step, hand_gan, real_batches
from conftest import Recorder, make_loader, make_model, quiet_params, only_run
from super_trainer import Callback, Trainer
from super_trainer.checkpoint import CheckpointError
from super_trainer.context import FIELD_DOCS


def gan_params(**overrides):
    params = quiet_params(max_epochs=3, silent_mode=True, optimizer=GAN_OPTIMIZERS, train_step=gan_step,
                          valid_metrics_list=[], metric_to_watch="g_loss")
    params.update(overrides)
    return params


def train_gan(tmp_path, name="gan", model=None, **overrides):
    model = model if model is not None else GAN()
    result = Trainer(name, tmp_path, device="cpu").train(model=model, training_params=gan_params(**overrides),
                                                         train_loader=real_batches())
    return model, result


@pytest.mark.parametrize("accumulate", [1, 2])
def test_a_gan_equals_the_hand_written_loop(tmp_path, accumulate):
    model, result = train_gan(tmp_path, batch_accumulate=accumulate)
    hand = hand_gan(3, real_batches(), accumulate=accumulate)
    for (name, value), expected in zip(model.state_dict().items(), hand.state_dict().values()):
        assert torch.equal(value, expected), name
    row = result.history[-1]
    assert {"train/d_loss", "train/g_loss"} <= set(row) and math.isfinite(row["train/g_loss"])
    ckpt = torch.load(result.latest_ckpt_path, weights_only=True)
    assert list(ckpt["net"]) == list(GAN().state_dict())  # both models, unprefixed
    assert ckpt["optimizer_type"] == {"discriminator": "Adam", "generator": "Adam"}
    assert ckpt["global_step"] == 3 * math.ceil(4 / accumulate)  # batches that made at least one update


class NamedRecorder(Recorder):
    def _record(self, name, context):
        super()._record(name, context)
        self.detail[-1] = self.detail[-1] + (context.optimizer_name,)


def test_each_update_fires_the_events_of_one_step_with_the_optimizer_named(tmp_path):
    recorder = NamedRecorder()
    train_gan(tmp_path, max_epochs=1, phase_callbacks=[recorder])
    first = recorder.detail[recorder.events.index("on_train_batch_start"):recorder.events.index("on_train_batch_end") + 1]
    update = ["on_train_batch_loss_end", "on_train_batch_backward_end", "on_train_batch_gradient_step_start",
              "on_train_batch_gradient_step_end"]
    assert [d[0] for d in first] == ["on_train_batch_start"] + update * 2 + ["on_train_batch_end"]
    assert [d[-1] for d in first] == [None] + ["discriminator"] * 4 + ["generator"] * 4 + [None]
    assert [d[3] for d in first] == [0, 0, 0, 0, 1, 1, 1, 1, 1, 1]  # global_step: one per batch
    assert recorder.events[:2] == ["on_optimizer_built", "on_training_start"]


class Capture(Callback):
    def on_training_end(self, context):
        self.context = context


def test_a_gan_run_writes_only_declared_context_fields_and_refuses_update_outside_the_step(tmp_path):
    capture = Capture()

    class Outside(Callback):
        def on_train_batch_end(self, context):
            with pytest.raises(RuntimeError, match=r"update\(loss\) works only inside training_params.train_step"):
                context.optimizers["generator"].update(context.loss)

    train_gan(tmp_path, max_epochs=1, phase_callbacks=[capture, Outside()], ema=True, lr_mode="cosine",
              clip_grad_norm=1.0, save_ckpt_every_n_steps=2)
    written = set(vars(capture.context)) - {"_trainer_owned", "_trainer_owned_locked"}
    assert written <= set(FIELD_DOCS), sorted(written - set(FIELD_DOCS))
    assert list(capture.context.optimizers) == ["discriminator", "generator"]
    assert capture.context.optimizer is capture.context.optimizers["discriminator"].optimizer


def test_the_mapping_is_checked_before_training(tmp_path):
    def bad(**entries):
        return train_gan(tmp_path, optimizer={**GAN_OPTIMIZERS, **entries})

    with pytest.raises(ValueError, match=r"'generator.0.weight' is selected by optimizers \['generator', 'all'\]"):
        bad(all={"params": "generator"})
    with pytest.raises(ValueError, match=r"trainable parameters \['discriminator.2.weight'.*in no optimizer"):
        bad(discriminator={"optimizer": "SGD", "params": "discriminator.0", "initial_lr": 0.1})
    with pytest.raises(ValueError, match="'nothing_here' selects no parameter"):
        bad(discriminator={"optimizer": "SGD", "params": "nothing_here", "initial_lr": 0.1})
    with pytest.raises(ValueError, match="optimizer.generator: 'params' is required"):
        bad(generator={"optimizer": "Adam", "initial_lr": 0.1})
    with pytest.raises(ValueError, match=r"several optimizers \(discriminator, generator\) need a train_step"):
        train_gan(tmp_path, train_step=None)


class InterruptAt(Callback):
    """Ctrl-C as code raises it, when the run's ``batch``-th train batch starts."""

    def __init__(self, batch):
        self.batch = batch

    def on_train_batch_start(self, context):
        if context.batches_seen == self.batch:
            raise KeyboardInterrupt


def test_a_gan_resumes_bit_exact_from_a_mid_epoch_interrupt(tmp_path):
    extras = dict(ema=True, ema_params={"decay": 0.9, "decay_type": "constant"}, lr_mode="cosine",
                  lr_warmup_epochs=1, batch_accumulate=2, clip_grad_norm=5.0, mixed_precision="bf16")
    full, _ = train_gan(tmp_path, name="full", **extras)
    full_ema = torch.load(only_run(tmp_path / "full") / "ckpt_latest.pth", weights_only=True)
    cut, result = train_gan(tmp_path, name="cut", phase_callbacks=[InterruptAt(7)], **extras)  # inside a window
    assert result.stop_reason == "interrupted"
    resumed, result = train_gan(tmp_path, name="cut", resume=True, **extras)
    assert result.stop_reason == "completed"
    for (name, value), expected in zip(resumed.state_dict().items(), full.state_dict().values()):
        assert torch.equal(value, expected), name
    ckpt = torch.load(only_run(tmp_path / "cut") / "ckpt_latest.pth", weights_only=True)
    for key, value in full_ema["ema_net"].items():
        assert torch.equal(ckpt["ema_net"][key], value), key
    for name in ("discriminator", "generator"):
        saved, expected = ckpt["optimizer_state_dict"][name], full_ema["optimizer_state_dict"][name]
        assert saved["param_groups"] == expected["param_groups"]
        for index, state in expected["state"].items():
            assert all(torch.equal(saved["state"][index][k], v) for k, v in state.items())


def test_a_resume_with_another_optimizer_mapping_is_refused(tmp_path):
    train_gan(tmp_path, max_epochs=1)
    model = GAN(seed=1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointError, match=r"optimizers \['discriminator', 'generator'\], this run has \['default'\]"):
        Trainer("gan", tmp_path, device="cpu").train(
            model=model, training_params=quiet_params(max_epochs=2, resume=True, silent_mode=True, loss="MSELoss",
                                                      valid_metrics_list=[], metric_to_watch="MSELoss"),
            train_loader=[(torch.randn(8, 4), torch.randn(8, 6))])
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # refused before any load


# ---- param groups added by callbacks ----------------------------------------------------------------------

class Net(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.backbone = nn.Linear(8, 16)
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        return self.head(torch.relu(self.backbone(x)))


class AddBackbone(Callback):
    """Lightning's BackboneFinetuning, the resumable way: the backbone's group is added when the optimizer is
    built, so a resume finds it."""

    def __init__(self, event="on_optimizer_built"):
        self.lrs = []
        setattr(self, event, self._add)

    def _add(self, context):
        context.optimizer.add_param_group({"params": list(context.net.backbone.parameters()), "lr": 0.01})

    def on_train_batch_gradient_step_end(self, context):
        self.lrs.append([group["lr"] for group in context.optimizer.param_groups])


def train_backbone(tmp_path, name, callback, max_epochs=3, extra_callbacks=(), **extras):
    model = Net()
    params = quiet_params(max_epochs=max_epochs, optimizer=torch.optim.SGD(model.head.parameters(), lr=0.1),
                          lr_mode="cosine", phase_callbacks=[callback, *extra_callbacks], silent_mode=True, **extras)
    params.pop("initial_lr")
    Trainer(name, tmp_path, device="cpu").train(model=model, training_params=params, train_loader=make_loader(n=32),
                                                valid_loader=make_loader(n=16, seed=1))
    return model


def test_a_param_group_added_in_on_optimizer_built_follows_the_schedule_and_survives_a_resume(tmp_path):
    full_cb = AddBackbone()
    full = train_backbone(tmp_path, "full", full_cb)
    assert len(full_cb.lrs) == 12  # 4 steps x 3 epochs; after step k: lr0 * cosine(it = k - 1, T = 12)
    for k, (head, backbone) in enumerate(full_cb.lrs):
        factor = 0.5 * (1 + math.cos(math.pi * k / 13)) * 0.99 + 0.01
        assert (head, backbone) == pytest.approx((0.1 * factor, 0.01 * factor), rel=1e-12)
    class StopAfterFirstEpoch(Callback):
        def on_train_loader_end(self, context):
            context.stop_training = True  # outside a batch: the epoch completes and is checkpointed

    train_backbone(tmp_path, "cut", AddBackbone(), extra_callbacks=[StopAfterFirstEpoch()])
    resumed = train_backbone(tmp_path, "cut", AddBackbone(), resume=True)
    for (name, value), expected in zip(resumed.state_dict().items(), full.state_dict().values()):
        assert torch.equal(value, expected), name


def test_a_group_added_after_the_resume_point_names_on_optimizer_built(tmp_path):
    train_backbone(tmp_path, "late", AddBackbone("on_training_start"), max_epochs=1)
    with pytest.raises(CheckpointError, match="has 2 optimizer param groups, this run has 1.*on_optimizer_built"):
        train_backbone(tmp_path, "late", AddBackbone("on_training_start"), resume=True)


@pytest.mark.parametrize("schedule", [
    {"lr_mode": "cosine"}, {"lr_mode": "poly"}, {"lr_mode": "exp", "lr_decay_factor": 0.5},
    {"lr_mode": "step", "lr_updates": [1, 2]},
    {"lr_mode": "function", "lr_schedule_function": lambda initial_lr, epoch, iter, max_epoch, iters_per_epoch:
        initial_lr / (1 + epoch * iters_per_epoch + iter)},
    {"lr_warmup_epochs": 2, "lr_mode": "cosine"}, {"lr_warmup_steps": 9, "warmup_mode": "linear_batch_step"},
])
def test_a_param_group_added_at_any_time_works_with_every_built_in_schedule(tmp_path, schedule):
    class AddLater(Callback):
        checked = 0

        def on_train_loader_start(self, context):
            if context.epoch == 1:  # no initial_lr given: its lr now is its lr0
                context.optimizer.add_param_group({"params": [extra], "lr": 0.05})

        def on_train_loader_end(self, context):
            groups = context.optimizer.param_groups
            if context.epoch >= 2:  # from the first schedule update after the add on
                self.checked += 1
                assert groups[1]["initial_lr"] == 0.05
                assert groups[1]["lr"] / 0.05 == pytest.approx(groups[0]["lr"] / groups[0]["initial_lr"])

    extra = nn.Parameter(torch.zeros(3), requires_grad=False)  # e.g. a layer a callback unfreezes later
    adder = AddLater()
    Trainer("later", tmp_path, device="cpu").train(
        model=make_model(), training_params=quiet_params(max_epochs=4, phase_callbacks=[adder], silent_mode=True,
                                                         **schedule),
        train_loader=make_loader(n=32), valid_loader=None)
    assert adder.checked == 2


# ---- mixed precision with a GradScaler ---------------------------------------------------------------------

def test_a_gan_with_a_grad_scaler_follows_torchs_recipe_for_several_optimizers(tmp_path, monkeypatch):
    """fp16 with a GradScaler (what mixed_precision gives on CUDA), here on CPU: every loss scaled, each optimizer
    unscaled and stepped through the scaler, and the scale updated once per batch after both steps."""
    import super_trainer.building as building

    monkeypatch.setattr(building, "autocast_and_scaler", lambda setting, device: (
        torch.autocast("cpu", dtype=torch.float16), torch.amp.GradScaler("cpu", init_scale=2.0 ** 20)))
    model, result = train_gan(tmp_path, mixed_precision=True, max_epochs=2)

    net = GAN()
    opt_d = torch.optim.Adam(net.discriminator.parameters(), lr=2e-3, betas=(0.5, 0.999), weight_decay=1e-4)
    opt_g = torch.optim.Adam(net.generator.parameters(), lr=1e-3, betas=(0.5, 0.999), weight_decay=1e-4)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 20)
    torch.manual_seed(42)
    for _ in range(2):
        for real, _ in real_batches():
            with torch.autocast("cpu", dtype=torch.float16):
                d_loss, fake, ones = gan_losses(net, real)
            scaler.scale(d_loss).backward()
            scaler.unscale_(opt_d)
            scaler.step(opt_d)
            opt_d.zero_grad()
            with torch.autocast("cpu", dtype=torch.float16):
                g_loss = nn.functional.binary_cross_entropy_with_logits(net.discriminator(fake), ones)
            scaler.scale(g_loss).backward(inputs=list(net.generator.parameters()))
            scaler.unscale_(opt_g)
            scaler.step(opt_g)
            opt_g.zero_grad()
            scaler.update()
    for (name, value), expected in zip(model.state_dict().items(), net.state_dict().values()):
        assert torch.equal(value, expected), name
    ckpt = torch.load(result.latest_ckpt_path, weights_only=True)
    assert ckpt["scaler_state_dict"]["scale"] == scaler.get_scale()
    assert scaler.get_scale() < 2.0 ** 20  # the first steps overflowed and were skipped, on both sides


def test_a_torch_scheduler_and_the_loggers_follow_every_optimizer(tmp_path):
    _, result = train_gan(tmp_path, max_epochs=2, lr_mode={"StepLR": {"step_size": 1, "gamma": 0.5}}, log_interval=1)
    ckpt = torch.load(result.latest_ckpt_path, weights_only=True)
    for name, lr0 in (("discriminator", 2e-3), ("generator", 1e-3)):
        assert ckpt["optimizer_state_dict"][name]["param_groups"][0]["lr"] == pytest.approx(lr0 * 0.25)
    assert set(ckpt["lr_scheduler_state"]["TorchSchedulerCallback[StepLR]"]) == {"discriminator", "generator"}
    resumed, result = train_gan(tmp_path, max_epochs=3, resume=True, lr_mode={"StepLR": {"step_size": 1, "gamma": 0.5}})
    ckpt = torch.load(result.latest_ckpt_path, weights_only=True)
    assert ckpt["optimizer_state_dict"]["generator"]["param_groups"][0]["lr"] == pytest.approx(1e-3 * 0.125)
    log = (only_run(tmp_path / "gan") / "experiment.log").read_text()
    for tag in ("Step/Train/loss/discriminator", "Step/Train/loss/generator", "Step/LR/generator/default",
                "LR/discriminator/default", "Train/d_loss"):
        assert tag in log, tag


def test_each_optimizer_has_its_own_initial_lr_mapping_and_sg_defaults(tmp_path):
    capture = Capture()
    optimizers = {"discriminator": {"optimizer": "SGD", "params": ["discriminator.0", "discriminator.2"],
                                    "initial_lr": {"discriminator.0": 0.01, "default": 0.02}},
                  "generator": {"params": "generator"}}  # SGD and the top-level initial_lr
    train_gan(tmp_path, max_epochs=1, optimizer=optimizers, initial_lr=0.03, phase_callbacks=[capture])
    groups = capture.context.optimizers["discriminator"].param_groups
    assert [(g["name"], g["initial_lr"], len(g["params"])) for g in groups] == [("discriminator.0", 0.01, 2),
                                                                                  ("default", 0.02, 2)]
    generator = capture.context.optimizers["generator"].optimizer
    assert type(generator) is torch.optim.SGD and generator.param_groups[0]["initial_lr"] == 0.03
    assert generator.param_groups[0]["momentum"] == 0.9  # SuperGradients' SGD defaults, per optimizer
    assert capture.context.training_params["optimizer"]["generator"]["optimizer_params"] == {"weight_decay": 1e-4,
                                                                                            "momentum": 0.9}
