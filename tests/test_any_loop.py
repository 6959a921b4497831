"""SPEC §8 "Batches" and "Custom steps": dict batches of a Hugging Face style model with its own loss, a multi-input
batch adapter, ambiguous batches, and a custom two-pass train_step, each against a hand-written loop."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from _any_models import (ImageMaskNet, TinyTextClassifier, contrastive_step, image_mask_adapter, image_mask_batches,
                         text_batches)
from conftest import Recorder, make_loader, make_model, quiet_params, only_run
from super_trainer import Callback, Trainer
from super_trainer.params import resolve_training_params
from super_trainer.recipes import check_model_fits_data
from super_trainer.steps import BATCH_ADAPTERS

SGD_DEFAULTS = {"momentum": 0.9, "weight_decay": 1e-4}  # SuperGradients' SGD defaults, which the trainer applies


def train(tmp_path, model, name="run", train_loader=None, valid_loader=None, **params):
    base = quiet_params(**{"max_epochs": 2, "silent_mode": True, **params})
    return Trainer(name, tmp_path, device="cpu").train(model=model, training_params=base, train_loader=train_loader,
                                                       valid_loader=valid_loader)


def assert_same_weights(a: nn.Module, b: nn.Module) -> None:
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(x, y), name


# ---- a Hugging Face style model: dict batches, model(**inputs), its own loss -------------------------------

def hand_text(epochs: int, batches, loss_from_model: bool) -> nn.Module:
    model = TinyTextClassifier()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, **SGD_DEFAULTS)
    for _ in range(epochs):
        for batch in batches:
            if loss_from_model:
                loss = model(**batch).loss
            else:
                inputs = {k: v for k, v in batch.items() if k != "labels"}
                loss = F.cross_entropy(model(**inputs).logits, batch["labels"])
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
    return model


@pytest.mark.parametrize("loss", [None, "model"])
def test_a_hugging_face_model_trains_on_dict_batches_with_its_own_loss(tmp_path, loss):
    batches = text_batches()
    model = TinyTextClassifier()
    result = train(tmp_path, model, train_loader=batches, valid_loader=text_batches(2, seed=9), loss=loss,
                   metric_to_watch="loss", greater_metric_to_watch_is_better=False)
    assert_same_weights(model, hand_text(2, batches, loss_from_model=True))
    assert set(result.history[-1]) >= {"train/loss", "valid/loss", "valid/Accuracy"}  # metrics on the logits
    ckpt = torch.load(result.latest_ckpt_path, weights_only=True)
    assert list(ckpt["net"]) == list(TinyTextClassifier().state_dict())  # the user's module, no wrapper prefix
    TinyTextClassifier().load_state_dict(ckpt["net"])


def test_a_dict_batch_with_a_criterion_calls_the_model_without_the_labels(tmp_path):
    batches = text_batches()
    model = TinyTextClassifier()

    class Logits(nn.Module):  # the criterion sees the model's output object
        def forward(self, output, target):
            return F.cross_entropy(output.logits, target)

    train(tmp_path, model, train_loader=batches, loss=Logits(), valid_metrics_list=[], metric_to_watch="Logits")
    assert_same_weights(model, hand_text(2, batches, loss_from_model=False))


def test_the_recipe_dry_run_follows_the_batch_rules():
    class Texts(Dataset):
        def __init__(self):
            self.rows = [{k: v[i] for k, v in text_batches(1, batch=4)[0].items()} for i in range(4)]

        def __len__(self):
            return 4

        def __getitem__(self, i):
            return self.rows[i]

    params = resolve_training_params({"max_epochs": 1, "initial_lr": 0.1, "loss": "model"})
    check_model_fits_data(TinyTextClassifier(), DataLoader(Texts(), batch_size=2), params, torch.device("cpu"))
    triples = DataLoader(list(zip(*[torch.randn(4, 6)] * 2, torch.arange(4))), batch_size=2)
    with pytest.raises(ValueError, match="batch_adapter"):
        check_model_fits_data(ImageMaskNet(), triples, resolve_training_params({"max_epochs": 1, "initial_lr": 0.1}),
                              torch.device("cpu"))


# ---- ambiguous batches and the batch adapter ---------------------------------------------------------------

@pytest.mark.parametrize("batches, shape", [
    (image_mask_batches(), r"tuple of 3 \(Tensor\[4, 6\], Tensor\[4, 6\], Tensor\[4\]\)"),
    ([torch.randn(4, 8)] * 3, r"Tensor\[4, 8\]"),
    ([{"input_ids": torch.ones(4, 5, dtype=torch.long)}] * 3, r"dict with keys \['input_ids'\]"),
])
def test_an_ambiguous_batch_raises_before_the_first_step_naming_its_shape_and_batch_adapter(tmp_path, batches, shape):
    recorder, model = Recorder(), make_model(features=6)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="batch_adapter") as raised:
        train(tmp_path, model, train_loader=batches, phase_callbacks=[recorder])
    assert raised.match(shape)
    assert "on_train_batch_gradient_step_start" not in recorder.events and "on_train_batch_start" not in recorder.events
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def hand_image_mask(epochs, batches):
    model = ImageMaskNet()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, **SGD_DEFAULTS)
    for _ in range(epochs):
        for image, mask, target in batches:
            F.cross_entropy(model(image=image, mask=mask), target).backward()
            optimizer.step()
            optimizer.zero_grad()
    return model


@pytest.mark.parametrize("adapter", [image_mask_adapter, "_any_models.image_mask_adapter", "image_mask",
                                     {"_target_": "_any_models.image_mask_adapter"}])
def test_a_batch_adapter_splits_multi_input_batches(tmp_path, adapter):
    BATCH_ADAPTERS.register("image_mask")(image_mask_adapter)
    batches, model = image_mask_batches(), ImageMaskNet()
    train(tmp_path, model, train_loader=batches, valid_loader=image_mask_batches(2, seed=5), batch_adapter=adapter)
    assert_same_weights(model, hand_image_mask(2, batches))


def test_a_batch_adapter_that_returns_another_shape_is_named(tmp_path):
    with pytest.raises(ValueError, match=r"batch_adapter must return \(inputs, target\).*returned Tensor"):
        train(tmp_path, ImageMaskNet(), train_loader=image_mask_batches(), batch_adapter=lambda batch: batch[0])
    with pytest.raises(ValueError, match="training_params.batch_adapter: 'no_such_adapter' is not a callable"):
        train(tmp_path, ImageMaskNet(), train_loader=image_mask_batches(), batch_adapter="no_such_adapter")


# ---- custom train steps -----------------------------------------------------------------------------------

def hand_contrastive(epochs, batches, accumulate, clip):
    model = make_model(classes=4)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, **SGD_DEFAULTS)
    for _ in range(epochs):
        for index, (x, _) in enumerate(batches):
            window = min(accumulate, len(batches) - (index - index % accumulate))
            z1 = F.normalize(model(x), dim=1)
            z2 = F.normalize(model(x.flip(1) * 0.9), dim=1)
            loss = F.cross_entropy(z1 @ z2.t() / 0.5, torch.arange(len(x)))
            (loss / window if window > 1 else loss).backward()
            if (index + 1) % accumulate == 0 or index + 1 == len(batches):
                torch.nn.utils.clip_grad_norm_(list(model.parameters()), clip)
                optimizer.step()
                optimizer.zero_grad()
    return model


@pytest.mark.parametrize("as_method", [False, True])
def test_a_contrastive_two_pass_step_equals_the_hand_written_loop(tmp_path, as_method):
    batches = [(x, y) for x, y in make_loader(n=40, batch_size=8)]
    model = make_model(classes=4)
    step = {}
    if as_method:
        model.train_step = contrastive_step  # a model's own train_step(context)
    else:
        step = {"train_step": contrastive_step}
    recorder = Recorder()
    result = train(tmp_path, model, train_loader=batches, batch_accumulate=2, clip_grad_norm=0.5,
                   phase_callbacks=[recorder], **step)
    assert_same_weights(model, hand_contrastive(2, batches, accumulate=2, clip=0.5))
    assert result.history[-1]["train/CrossEntropyLoss"] > 0  # a tensor is logged under the loss's name
    one_epoch = recorder.events[recorder.events.index("on_train_loader_start"):recorder.events.index("on_train_loader_end")]
    assert one_epoch.count("on_train_batch_loss_end") == 5 and one_epoch.count("on_train_batch_gradient_step_end") == 3


def test_a_step_returning_a_dict_logs_each_entry_and_backwards_their_sum(tmp_path):
    batches = [(x, y) for x, y in make_loader(n=24, batch_size=8)]

    def two_losses(context):
        preds = context.preds = context.net(context.inputs)
        return {"ce": F.cross_entropy(preds, context.target), "l2": preds.pow(2).mean() * 0.1}

    model = make_model()
    result = train(tmp_path, model, train_loader=batches, valid_loader=batches, train_step=two_losses,
                   train_metrics_list=["Accuracy"])
    hand = make_model()
    optimizer = torch.optim.SGD(hand.parameters(), lr=0.1, **SGD_DEFAULTS)
    for _ in range(2):
        for x, y in batches:
            preds = hand(x)
            (F.cross_entropy(preds, y) + preds.pow(2).mean() * 0.1).backward()
            optimizer.step()
            optimizer.zero_grad()
    assert_same_weights(model, hand)
    row = result.history[-1]
    assert {"train/ce", "train/l2", "train/Accuracy", "valid/CrossEntropyLoss", "valid/Accuracy"} <= set(row)
    assert math.isfinite(row["train/ce"]) and row["train/l2"] > 0


def test_bad_train_steps_are_named(tmp_path):
    batches = [(x, y) for x, y in make_loader(n=16, batch_size=8)]
    with pytest.raises(ValueError, match=r"train_step's result must be a scalar tensor.*shape \(8, 3\)"):
        train(tmp_path, make_model(), train_loader=batches, train_step=lambda context: context.net(context.inputs))

    class MMEngineStyle(nn.Sequential):
        def train_step(self, data, optim_wrapper):
            return {}

    with pytest.raises(ValueError, match=r"train_step\(data, optim_wrapper\) is not train_step\(context\)"):
        train(tmp_path, MMEngineStyle(nn.Linear(8, 3)), train_loader=batches)
    with pytest.raises(ValueError, match="train_metrics_list: the train_step stored no context.preds"):
        train(tmp_path, make_model(), train_loader=batches, train_metrics_list=["Accuracy"],
              train_step=lambda context: F.cross_entropy(context.net(context.inputs), context.target))


def test_trainer_test_follows_the_batch_rules(tmp_path):
    model = TinyTextClassifier()
    metrics = Trainer("test", tmp_path, device="cpu").test(model=model, test_loader=text_batches(2), loss="model")
    assert set(metrics) == {"loss", "Accuracy"}
    metrics = Trainer("test", tmp_path, device="cpu").test(model=ImageMaskNet(), test_loader=image_mask_batches(2),
                                                           batch_adapter=image_mask_adapter)
    assert set(metrics) == {"Accuracy"}


# ---- every shape resumes bit-exact, with AMP, accumulation, clipping and EMA --------------------------------

class InterruptAt(Callback):
    def __init__(self, batch):
        self.batch = batch

    def on_train_batch_start(self, context):
        if context.batches_seen == self.batch:
            raise KeyboardInterrupt  # as Ctrl-C: ckpt_latest is written at the last finished batch


SHAPES = {
    "hf": (TinyTextClassifier, lambda: text_batches(6), {"loss": "model", "metric_to_watch": "loss"}),
    "adapter": (ImageMaskNet, lambda: image_mask_batches(6), {"batch_adapter": image_mask_adapter}),
    "contrastive": (lambda: make_model(classes=4), lambda: [(x, y) for x, y in make_loader(n=48, batch_size=8)],
                    {"train_step": contrastive_step, "valid_metrics_list": [], "metric_to_watch": "CrossEntropyLoss"}),
}


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_every_shape_resumes_bit_exact_from_a_mid_epoch_interrupt(tmp_path, shape):
    make, data, own = SHAPES[shape]
    extras = dict(own, max_epochs=3, mixed_precision="bf16", batch_accumulate=2, clip_grad_norm=1.0, ema=True,
                  ema_params={"decay": 0.9, "decay_type": "constant"}, lr_mode="cosine")
    full = make()
    train(tmp_path, full, name="full", train_loader=data(), **extras)
    cut = make()
    result = train(tmp_path, cut, name="cut", train_loader=data(), phase_callbacks=[InterruptAt(9)], **extras)
    assert result.stop_reason == "interrupted"
    resumed = make()
    train(tmp_path, resumed, name="cut", train_loader=data(), resume=True, **extras)
    assert_same_weights(resumed, full)
    ema = [torch.load(only_run(tmp_path / name) / "ckpt_latest.pth", weights_only=True)["ema_net"] for name in ("full", "cut")]
    assert all(torch.equal(ema[0][k], ema[1][k]) for k in ema[0])
