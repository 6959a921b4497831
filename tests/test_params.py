"""training_params errors are one clear ValueError before the first batch, naming the key (SPEC §2)."""
from __future__ import annotations

import pytest
import torch

from conftest import Recorder, make_loader, make_model, only_run, quiet_params
from super_trainer import Trainer


def train(tmp_path, model=None, **overrides):
    return Trainer("p", tmp_path).train(model=model or make_model(), training_params=quiet_params(**overrides),
                                        train_loader=make_loader(), valid_loader=make_loader(16))


@pytest.mark.parametrize("overrides, words", [
    ({"max_epoch": 3}, "unknown key 'max_epoch'; did you mean 'max_epochs'"),
    ({"lr_mod": "cosine"}, "did you mean 'lr_mode'"),
    ({"max_epochs": 0}, "max_epochs: must be an int >= 1"),
    ({"initial_lr": None}, "initial_lr: is required"),
    ({"initial_lr": "fast"}, "initial_lr: must be a number"),
    ({"optimizer": "Adamm"}, "unknown optimizer 'Adamm'; did you mean 'Adam'"),
    ({"loss": "CrossEntropy"}, "unknown loss 'CrossEntropy'; did you mean 'CrossEntropyLoss'"),
    ({"valid_metrics_list": ["Acuracy"]}, "valid_metrics_list: unknown metric 'Acuracy'; did you mean 'Accuracy'"),
    ({"metric_to_watch": "Accuracyy"}, r"metric_to_watch: 'Accuracyy' is not a metrics_dict key; valid keys: \['CrossEntropyLoss', 'Accuracy'\]"),
    ({"lr_mode": "cosin"}, "lr_mode: unknown value 'cosin'"),
    ({"warmup_mode": "linear"}, "warmup_mode: unknown value 'linear'"),
    ({"mixed_precision": "fp8"}, "mixed_precision: must be one of"),
    ({"batch_accumulate": 0}, "batch_accumulate: must be an int >= 1"),
    ({"sg_logger": "wandb"}, "sg_logger: must be one of"),
    ({"ema_params": {"decay_typ": "exp"}}, "ema_params: unknown key 'decay_typ'; did you mean 'decay_type'"),
    ({"ema": True, "ema_params": {"decay_type": "linear"}}, "decay_type: unknown 'linear'"),
    ({"optimizer_params": {"momentun": 0.9}}, "optimizer_params"),
    ({"initial_lr": {"nope.": 0.1, "default": 0.1}}, "prefix 'nope.' matches no parameter"),
    ({"phase_callbacks": ["NoSuchCallback"]}, "phase_callbacks: unknown callback 'NoSuchCallback'"),
    ({"lr_mode": {"StepLRR": {"step_size": 1}}}, "unknown torch scheduler 'StepLRR'; did you mean 'StepLR'"),
])
def test_bad_params_raise_before_training(tmp_path, overrides, words):
    recorder = Recorder()
    params = quiet_params(**overrides)
    params["phase_callbacks"] = params.get("phase_callbacks", []) + [recorder]
    with pytest.raises(ValueError, match=words) as info:
        Trainer("p", tmp_path).train(model=make_model(), training_params=params,
                                     train_loader=make_loader(), valid_loader=make_loader(16))
    assert "\n" not in str(info.value)
    assert recorder.events == []  # raised before any event
    assert not (tmp_path / "p").exists()  # no run dir was made


def test_max_epochs_is_required(tmp_path):
    params = quiet_params()
    del params["max_epochs"]
    with pytest.raises(ValueError, match="max_epochs: is required"):
        Trainer("p", tmp_path).train(model=make_model(), training_params=params, train_loader=make_loader())


def test_optimizer_instance_forbids_initial_lr_and_uses_its_lrs(tmp_path):
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.03)
    with pytest.raises(ValueError, match="initial_lr: must not be given"):
        train(tmp_path, model=model, optimizer=optimizer)
    with pytest.raises(ValueError, match="optimizer_params: does not apply to an Optimizer instance"):
        params = quiet_params(optimizer=optimizer, optimizer_params={"momentum": 0.9})
        del params["initial_lr"]
        Trainer("p", tmp_path).train(model=model, training_params=params, train_loader=make_loader())
    params = quiet_params(optimizer=optimizer, max_epochs=1)
    del params["initial_lr"]
    Trainer("p", tmp_path).train(model=model, training_params=params, train_loader=make_loader())
    assert optimizer.param_groups[0]["initial_lr"] == 0.03


def test_initial_lr_mapping_builds_groups_by_longest_prefix(tmp_path):
    seen = {}
    from super_trainer import Callback

    class Look(Callback):
        def on_training_start(self, context):
            seen["groups"] = [(g["name"], g["lr"], len(g["params"])) for g in context.optimizer.param_groups]

    model = make_model()
    before = model[0].weight.clone()
    train(tmp_path, model=model, max_epochs=1, initial_lr={"0.": 0.0, "2.w": 0.2, "default": 0.1},
          phase_callbacks=[Look()])
    assert seen["groups"] == [("0.", 0.0, 2), ("2.w", 0.2, 1), ("default", 0.1, 1)]
    assert torch.equal(model[0].weight, before)  # lr 0 froze the first layer
    assert not model[0].weight.requires_grad


def test_zero_weight_decay_on_bias_and_bn(tmp_path):
    seen = {}
    from super_trainer import Callback

    class Look(Callback):
        def on_training_start(self, context):
            seen["groups"] = [(g["name"], g["weight_decay"], len(g["params"])) for g in context.optimizer.param_groups]

    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.BatchNorm1d(16), torch.nn.Linear(16, 3))
    train(tmp_path, model=model, max_epochs=1, zero_weight_decay_on_bias_and_bn=True,
          optimizer_params={"weight_decay": 0.01}, phase_callbacks=[Look()])
    # decayed: the two Linear weights; not decayed: two biases + BN weight and bias
    assert seen["groups"] == [("default", 0.01, 2), ("default_no_decay", 0.0, 4)]


def test_dictconfig_params_are_accepted(tmp_path):
    from omegaconf import OmegaConf

    params = OmegaConf.create(quiet_params(max_epochs=1, phase_callbacks=[]))
    result = Trainer("p", tmp_path).train(model=make_model(), training_params=params, train_loader=make_loader(),
                                          valid_loader=make_loader(16))
    assert result.stop_reason == "completed"
    saved = OmegaConf.load(only_run(tmp_path / "p") / "training_params.yaml")
    assert saved.max_epochs == 1 and saved.loss == "CrossEntropyLoss"


def test_metrics_dict_keys_and_titles(tmp_path):
    import torchmetrics

    from super_trainer import Callback

    seen = {}

    class Look(Callback):
        def on_train_loader_end(self, context):
            seen["train"] = list(context.metrics_dict)

        def on_validation_loader_end(self, context):
            seen["valid"] = list(context.metrics_dict)

    metric = torchmetrics.classification.MulticlassF1Score(num_classes=3)
    train(tmp_path, max_epochs=1, train_metrics_list=["Accuracy"],
          valid_metrics_list=["Accuracy", {"Top5": {"top_k": 2}}, metric, {"f1_macro": torchmetrics.F1Score(task="multiclass", num_classes=3)}],
          phase_callbacks=[Look()])
    assert seen["train"] == ["CrossEntropyLoss", "Accuracy"]
    assert seen["valid"] == ["CrossEntropyLoss", "Accuracy", "Top5", "MulticlassF1Score", "f1_macro"]


def test_loss_with_components_is_logged_per_component(tmp_path):
    class TwoPart(torch.nn.Module):
        component_names = ["ce", "l2"]

        def forward(self, preds, target):
            ce = torch.nn.functional.cross_entropy(preds, target)
            l2 = preds.pow(2).mean() * 0.01
            return ce + l2, torch.stack([ce, l2]).detach()

    class Anonymous(torch.nn.Module):
        def forward(self, preds, target):
            ce = torch.nn.functional.cross_entropy(preds, target)
            return ce, torch.stack([ce, ce * 2]).detach()

    result = train(tmp_path, max_epochs=1, loss=TwoPart(), metric_to_watch="TwoPart/ce",
                   greater_metric_to_watch_is_better=False)
    assert list(result.metrics)[:2] == ["TwoPart/ce", "TwoPart/l2"]
    assert result.best_metric == result.metrics["TwoPart/ce"]
    result = train(tmp_path, max_epochs=1, loss=Anonymous(), metric_to_watch="Anonymous/loss_1",
                   greater_metric_to_watch_is_better=False)
    assert result.metrics["Anonymous/loss_1"] == pytest.approx(2 * result.metrics["Anonymous/loss_0"])
