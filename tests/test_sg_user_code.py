"""SuperGradients user code and recipe idioms (SPEC §8 "SuperGradients recipes verbatim"): `_target_` paths into
super_gradients, SG's registry decorators, compound metrics, the SG context fields and logger API, Lamb, the YOLOv5
warmup, SG's tolerated keys, `initial_lr: 0`, `load_opt_params: False`, and the variable_setup shortcuts."""
from __future__ import annotations

import json
import math
import warnings

import numpy as np
import pytest
import torch
import torch.nn as nn
from omegaconf import OmegaConf
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torchmetrics import Metric

from conftest import make_loader, make_model, quiet_params, only_run
from super_trainer import Callback, EarlyStop, Phase, Trainer
from super_trainer.losses import build_criterion
from super_trainer.optimizers import step_takes_closure
from super_trainer.callbacks import TensorBoardLogger, YoloV5LRWarmup
from super_trainer.checkpoint import CheckpointError, read_checkpoint
from super_trainer.metrics import Accuracy
from super_trainer.optimizers import Lamb, RMSpropTF
from super_trainer.params import resolve_training_params
from super_trainer import registry, sg_compat


# ---- _target_ paths into super_gradients ----------------------------------------------------------------------

def test_sg_targets_resolve_to_their_equivalents_here():
    assert not sg_compat.sg_installed()
    build = sg_compat.instantiate
    assert build({"_target_": "super_gradients.training.utils.utils.empty_list"}) == []
    phase = {"_target_": "super_gradients.training.utils.callbacks.base_callbacks.Phase", "value": "TRAIN_EPOCH_END"}
    assert build(phase) is Phase.TRAIN_EPOCH_END
    assert build(dict(phase, _target_="super_gradients.training.utils.callbacks.callbacks.Phase")) is Phase.TRAIN_EPOCH_END
    assert isinstance(build({"_target_": "super_gradients.training.metrics.classification_metrics.Accuracy"}), Accuracy)
    assert sg_compat.resolve_sg_target("super_gradients.training.utils.optimizers.lamb.Lamb") is Lamb
    assert sg_compat.resolve_sg_target("super_gradients.training.utils.optimizers.rmsprop_tf.RMSpropTF") is RMSpropTF
    stop = build({"_target_": "super_gradients.training.utils.callbacks.callbacks.EarlyStop", "phase": phase,
                  "monitor": "Accuracy", "mode": "max"})
    assert isinstance(stop, EarlyStop) and stop.phase is Phase.TRAIN_EPOCH_END


def test_sg_loss_target_is_built_by_name_so_smooth_eps_applies():
    loss = {"_target_": "super_gradients.training.losses.label_smoothing_cross_entropy_loss.CrossEntropyLoss",
            "smooth_eps": 0.1}
    criterion = build_criterion({"loss": loss, "criterion_params": {}}, torch.device("cpu"))
    assert isinstance(criterion, nn.CrossEntropyLoss) and criterion.label_smoothing == 0.1


def test_a_registered_object_stands_for_any_sg_path_of_its_name():
    @registry.register_callback("MyPostPrediction")
    class MyPostPrediction:
        def __init__(self, iou: float) -> None:
            self.iou = iou

    built = sg_compat.instantiate({"_target_": "super_gradients.training.models.detection_models.yolo_base."
                                               "MyPostPrediction", "iou": 0.65})
    assert isinstance(built, MyPostPrediction) and built.iou == 0.65  # a class local to this function works too


def test_an_sg_target_with_no_equivalent_is_one_error_naming_it(tmp_path):
    path = "super_gradients.training.utils.detection_utils.Anchors"
    with pytest.raises(ValueError) as info:
        sg_compat.instantiate({"_target_": path, "anchors_list": [[1, 2]], "strides": [8]})
    message = str(info.value)
    assert path in message and "\n" not in message and "register" in message
    spec = {"EarlyStop": {"phase": {"_target_": "super_gradients.training.utils.callbacks.NoSuchPhase"},
                          "monitor": "Accuracy"}}
    with pytest.raises(ValueError, match="NoSuchPhase"):  # nested in a recipe's callback: before any event
        Trainer("bad_target", tmp_path).train(model=make_model(), training_params=quiet_params(phase_callbacks=[spec]),
                                             train_loader=make_loader(), valid_loader=make_loader(16))


def test_early_stop_phase_as_sgs_target_node_in_a_recipe_spec(tmp_path):
    spec = {"EarlyStop": {"phase": {"_target_": "super_gradients.training.utils.callbacks.base_callbacks.Phase",
                                    "value": "VALIDATION_EPOCH_END"},
                          "monitor": "Accuracy", "mode": "max", "patience": 1, "threshold": 0.0}}
    result = Trainer("early", tmp_path).train(model=make_model(), training_params=quiet_params(
        max_epochs=3, phase_callbacks=[spec]), train_loader=make_loader(), valid_loader=make_loader(16))
    assert result.stop_reason == "early_stop" and len(result.history) == 1  # threshold reached at once


# ---- registry decorators --------------------------------------------------------------------------------------

def test_sg_registry_decorators_in_every_call_form(tmp_path):
    @registry.register_model()
    class SgTinyNet(nn.Sequential):
        def __init__(self, classes: int = 3) -> None:
            super().__init__(nn.Linear(8, classes))

    @registry.register_loss("sg_smooth_ce")
    class SmoothCE(nn.CrossEntropyLoss):
        pass

    @registry.register_metric(name="SgAcc", deprecated_name="sg_acc_old")
    class SgAcc(Accuracy):
        pass

    @registry.register_optimizer
    class SgPlainSGD(torch.optim.SGD):
        pass

    @registry.register_dataset()
    class SgData(torch.utils.data.TensorDataset):
        pass

    assert registry.MODELS.get("SgTinyNet") is SgTinyNet and registry.LOSSES.get("sg_smooth_ce") is SmoothCE
    assert registry.METRICS.get("sg_acc_old") is SgAcc and registry.OPTIMIZERS.get("SgPlainSGD") is SgPlainSGD
    assert registry.DATASETS.get("SgData") is SgData
    result = Trainer("decorated", tmp_path).train(
        model=registry.MODELS.build({"SgTinyNet": {"classes": 3}}), train_loader=make_loader(),
        valid_loader=make_loader(16), training_params=quiet_params(
            max_epochs=1, loss="sg_smooth_ce", valid_metrics_list=["SgAcc"], metric_to_watch="SgAcc",
            optimizer="SgPlainSGD"))
    assert "SgAcc" in result.metrics and result.loss_names == ["SmoothCE"]

    class Other(nn.Module):
        pass

    with pytest.raises(ValueError, match="'SgTinyNet' is already registered"):
        registry.register_model("SgTinyNet")(Other)


# ---- compound metrics -----------------------------------------------------------------------------------------

class Detection(Metric):
    """An SG-style compound metric: component_names, compute() returning a dict (plus SG's additional_items)."""

    full_state_update = False

    def __init__(self) -> None:
        super().__init__()
        self.component_names = ["Precision@0.50", "mAP@0.50:0.95"]
        self.add_state("hits", default=torch.tensor(0.0), dist_reduce_fx="sum")
        self.add_state("seen", default=torch.tensor(0.0), dist_reduce_fx="sum")

    def update(self, preds, target) -> None:
        self.hits += (preds.argmax(1) == target).sum()
        self.seen += target.numel()

    def compute(self):
        accuracy = self.hits / self.seen
        return {"Precision@0.50": accuracy, "mAP@0.50:0.95": accuracy / 2, "additional_items": torch.zeros(3)}


def test_compound_metric_logs_each_component_and_is_watched_by_component(tmp_path):
    result = Trainer("compound", tmp_path).train(
        model=make_model(), train_loader=make_loader(), valid_loader=make_loader(16),
        training_params=quiet_params(max_epochs=2, valid_metrics_list=[Detection()], metric_to_watch="mAP@0.50:0.95",
                                     sg_logger="tensorboard", train_metrics_list=[{"Det": Detection()}]))
    assert list(result.metrics) == ["CrossEntropyLoss", "Precision@0.50", "mAP@0.50:0.95"]
    assert result.metrics["mAP@0.50:0.95"] == pytest.approx(result.metrics["Precision@0.50"] / 2)
    assert result.best_metric == max(h["valid/mAP@0.50:0.95"] for h in result.history)
    assert "train/Precision@0.50" in result.history[0]
    events = EventAccumulator(str(only_run(tmp_path / "compound")))
    events.Reload()
    assert {"Valid/mAP@0.50:0.95", "Valid/Precision@0.50", "Train/mAP@0.50:0.95"} <= set(events.Tags()["scalars"])


def test_an_unknown_component_is_refused_before_training(tmp_path):
    seen = []

    class Starts(Callback):
        def on_training_start(self, context):
            seen.append(context.epoch)

    with pytest.raises(ValueError, match=r"metric_to_watch: 'mAP@0.50' .*'mAP@0.50:0.95'"):
        Trainer("compound_bad", tmp_path).train(
            model=make_model(), train_loader=make_loader(), valid_loader=make_loader(16), training_params=quiet_params(
                valid_metrics_list=[Detection()], metric_to_watch="mAP@0.50", phase_callbacks=[Starts()]))
    assert seen == [] and not (tmp_path / "compound_bad").exists()
    with pytest.raises(ValueError, match="two metrics produce the key 'Precision@0.50'"):
        Trainer("dup", tmp_path).train(model=make_model(), train_loader=make_loader(), training_params=quiet_params(
            valid_metrics_list={"a": Detection(), "b": Detection()}))


# ---- the context's SG fields ----------------------------------------------------------------------------------

class ContextProbe(Callback):
    def __init__(self) -> None:
        self.train, self.valid = [], []

    def on_train_batch_end(self, context) -> None:
        metrics = context.metrics_compute_fn
        self.train.append((list(context.loss_logging_items_names), context.loss_log_items.item(),
                           context.loss_avg_meter.average, (metrics, metrics["Accuracy"].total.item()),
                           context.ddp_silent_mode))

    def on_validation_batch_end(self, context) -> None:
        self.valid.append((context.loss_avg_meter.average, context.metrics_compute_fn))


def test_context_carries_sgs_fields_with_sgs_meaning(tmp_path):
    probe = ContextProbe()
    Trainer("ctx", tmp_path).train(model=make_model(), train_loader=make_loader(), valid_loader=make_loader(16),
                                   training_params=quiet_params(max_epochs=1, train_metrics_list=["Accuracy"],
                                                                phase_callbacks=[probe]))
    losses = [loss for _, loss, _, _, _ in probe.train]
    for i, (names, _, average, (metrics, seen), silent) in enumerate(probe.train):
        assert names == ["CrossEntropyLoss"] and silent is False
        assert average == pytest.approx(np.mean(losses[:i + 1]))  # the running average of this pass so far
        assert list(metrics.keys()) == ["Accuracy"] and seen == 8 * (i + 1)  # the train metrics, updated so far
    assert probe.valid[0][1] is not probe.train[0][3][0] and list(probe.valid[0][1].keys()) == ["Accuracy"]
    with pytest.raises(RuntimeError, match="kept by the trainer"):
        Trainer("ctx2", tmp_path).train(model=make_model(), train_loader=make_loader(), training_params=quiet_params(
            max_epochs=1, phase_callbacks=[UpdatesMeter()]))


class UpdatesMeter(Callback):
    def on_train_batch_end(self, context) -> None:
        context.loss_avg_meter.update(context.loss_log_items, len(context.inputs))  # SG's MetricsUpdateCallback


# ---- the logger's SG API -------------------------------------------------------------------------------------

def test_logger_takes_sgs_keyword_forms_and_sg_methods(tmp_path):
    logger = TensorBoardLogger(log_dir=tmp_path)
    logger.add_scalar(tag="sg/scalar", scalar_value=0.5, global_step=3)
    logger.add_scalars(tag_scalar_dict={"sg/a": 1.0, "sg/b": 2.0}, global_step=4)
    logger.add_text(tag="sg/text", text_string="hello", global_step=1)
    logger.add_image(tag="sg/image", image=np.zeros((4, 5, 3), dtype=np.uint8), data_format="HWC", global_step=2)
    logger.add_images(tag="sg/images", images=torch.rand(2, 4, 5, 1), data_format="NHWC", global_step=2)
    logger.add_histogram(tag="sg/hist", values=torch.arange(10.0), bins="auto", global_step=5)
    logger.add_config("recipe", {"lr": 0.1, "cfg": OmegaConf.create({"a": [1, 2]})})
    logger.add_checkpoint(tag="my_ckpt", state_dict={"net": {"w": torch.ones(2)}, "cfg": OmegaConf.create({"k": 1})})
    logger.add_checkpoint(tag=None, state_dict={"epoch": 7}, global_step=7)
    logger.add_file("notes.txt")
    assert logger.local_dir() == str(tmp_path)
    logger.upload()
    logger.close()
    events = EventAccumulator(str(tmp_path), size_guidance={"scalars": 0, "images": 0, "histograms": 0, "tensors": 0})
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("sg/scalar")] == [(3, 0.5)]
    assert [(e.step, e.value) for e in events.Scalars("sg/b")] == [(4, 2.0)]
    image = events.Images("sg/image")[0]
    assert (image.step, image.width, image.height) == (2, 5, 4)
    assert events.Histograms("sg/hist")[0].step == 5
    saved = torch.load(tmp_path / "my_ckpt.pth", weights_only=True)  # the OmegaConf node became a plain dict
    assert saved["cfg"] == {"k": 1} and torch.equal(saved["net"]["w"], torch.ones(2))
    assert torch.load(tmp_path / "ckpt_7.pth", weights_only=True) == {"epoch": 7}
    log = (tmp_path / "experiment.log").read_text()
    assert json.dumps({"lr": 0.1, "cfg": {"a": [1, 2]}}, indent=4) in log and "file notes.txt" in log
    with pytest.raises(TypeError, match="not both"):
        TensorBoardLogger(log_dir=tmp_path / "x").add_scalar("t", 1.0, step=1, global_step=2)
    with pytest.raises(ValueError, match="data_format 'CWH'"):
        TensorBoardLogger(log_dir=tmp_path / "y").add_image("t", np.zeros((3, 4, 5)), data_format="CWH")


# ---- Lamb ----------------------------------------------------------------------------------------------------

def lamb_by_hand(p, g, m, v, step, lr, wd, beta1=0.9, beta2=0.999, eps=1e-6, max_norm=1.0):
    """One Lamb step on plain lists (one parameter tensor, so its grads are the global norm's)."""
    norm = math.sqrt(sum(x * x for x in g))
    g = [x / (norm / max_norm) for x in g] if norm > max_norm else g
    m = [beta1 * a + (1 - beta1) * x for a, x in zip(m, g)]
    v = [beta2 * a + (1 - beta2) * x * x for a, x in zip(v, g)]
    c1, c2 = 1 - beta1 ** step, 1 - beta2 ** step
    u = [(a / c1) / (math.sqrt(b) / math.sqrt(c2) + eps) for a, b in zip(m, v)]
    if wd:
        u = [a + wd * w for a, w in zip(u, p)]
        ratio = math.sqrt(sum(w * w for w in p)) / math.sqrt(sum(a * a for a in u))
        u = [a * ratio for a in u]
    return [w - lr * a for w, a in zip(p, u)], m, v


@pytest.mark.parametrize("grads, wd", [([[0.3, -0.4], [0.1, 0.2]], 0.02), ([[3.0, 4.0], [-6.0, 8.0]], 0.0)])
def test_lamb_matches_a_hand_computed_step(grads, wd):
    weight = torch.tensor([1.0, -2.0], dtype=torch.float64, requires_grad=True)
    optimizer = Lamb([weight], lr=0.1, weight_decay=wd)
    p, m, v = [1.0, -2.0], [0.0, 0.0], [0.0, 0.0]
    for step, grad in enumerate(grads, start=1):
        weight.grad = torch.tensor(grad, dtype=torch.float64)
        optimizer.step()
        p, m, v = lamb_by_hand(p, grad, m, v, step, lr=0.1, wd=wd)
        assert weight.detach().tolist() == pytest.approx(p, rel=1e-10)
    assert optimizer.param_groups[0]["step"] == 2  # SG keeps one step count per group, in the group


def test_sgs_optimizers_step_without_a_closure_so_fp16_can_scale_them():
    """SG's recipes pair RMSpropTF and Lamb with mixed_precision: a closure step would refuse fp16's GradScaler."""
    params = [nn.Parameter(torch.ones(2))]
    assert not step_takes_closure(Lamb(params)) and not step_takes_closure(RMSpropTF(params))


def test_lamb_trains_from_a_recipe_name_with_sgs_params(tmp_path):
    result = Trainer("lamb", tmp_path).train(model=make_model(), train_loader=make_loader(), training_params=quiet_params(
        max_epochs=1, optimizer="Lamb", optimizer_params={"weight_decay": 0.02}, initial_lr=5e-3))
    state = read_checkpoint(only_run(tmp_path / "lamb") / "ckpt_latest.pth")
    assert state["optimizer_type"] == "Lamb" and state["optimizer_state_dict"]["param_groups"][0]["weight_decay"] == 0.02
    assert result.stop_reason == "completed"


# ---- YOLOv5 warmup and SG's warmup keys -------------------------------------------------------------------------

class BiasGroups(nn.Module):
    """A model that names a "bias" param group, as SG's YOLO models did."""

    def __init__(self) -> None:
        super().__init__()
        self.body = make_model()

    def forward(self, x):
        return self.body(x)

    def initialize_param_groups(self, lr, training_params):
        named = list(self.named_parameters())
        return [{"named_params": [(n, p) for n, p in named if n.endswith("bias")], "name": "bias"},
                {"named_params": [(n, p) for n, p in named if not n.endswith("bias")], "name": "weights"}]


class GroupProbe(Callback):
    def __init__(self) -> None:
        self.seen = []

    def on_train_batch_gradient_step_start(self, context) -> None:  # what the step is about to use
        self.seen.append({g["name"]: (g["lr"], g["momentum"]) for g in context.optimizer.param_groups})


def test_yolov5_warmup_interpolates_lr_and_momentum_as_sg_2_did(tmp_path):
    probe = GroupProbe()
    Trainer("yolo", tmp_path).train(model=BiasGroups(), train_loader=make_loader(32, 8), training_params=quiet_params(
        max_epochs=2, initial_lr=0.1, warmup_mode="yolov5_warmup", lr_warmup_epochs=1, warmup_momentum=0.5,
        warmup_bias_lr=0.2, optimizer_params={"momentum": 0.9}, phase_callbacks=[probe]))
    n_w = 4  # 1 warmup epoch of 4 batches
    for n, groups in enumerate(probe.seen[:4]):
        assert groups["bias"][0] == pytest.approx(0.2 + n / n_w * (0.1 - 0.2))
        assert groups["weights"][0] == pytest.approx(n / n_w * 0.1)
        assert groups["bias"][1] == groups["weights"][1] == pytest.approx(0.5 + n / n_w * (0.9 - 0.5))
    assert probe.seen[4] == probe.seen[3]  # epoch 1: no schedule, the last warmup values stay (as in SG)


def test_sgs_warmup_keys_without_their_warmup_are_accepted_with_a_warning():
    with pytest.warns(UserWarning, match="warmup_momentum and warmup_bias_lr take effect only with warmup_mode "
                                         "'yolov5_warmup'"):
        params = resolve_training_params(quiet_params(max_epochs=4, lr_warmup_epochs=3, warmup_momentum=0.8,
                                                      warmup_bias_lr=0.1, warmup_mode="LinearEpochLRWarmup"))
    assert (params.warmup_momentum, params.warmup_bias_lr) == (0.8, 0.1)
    with pytest.warns(UserWarning, match="runs no warmup, as in SuperGradients"):
        resolve_training_params(quiet_params(warmup_mode="LinearEpochLRWarmup", lr_warmup_steps=256))
    with pytest.warns(UserWarning, match="exceed max_epochs=1"):
        resolve_training_params(quiet_params(max_epochs=1, lr_warmup_epochs=5))
    assert YoloV5LRWarmup(2).warmup_epochs == 2


# ---- multiply_head_lr, initial_lr 0, resume None, load_opt_params -------------------------------------------

class HeadLR(nn.Module):
    """Reads multiply_head_lr as SG's segmentation models do."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone, self.head = nn.Linear(8, 8), nn.Linear(8, 3)

    def forward(self, x):
        return self.head(self.backbone(x))

    def initialize_param_groups(self, lr, training_params):
        factor = training_params.get("multiply_head_lr", 1)
        return [{"named_params": list(self.backbone.named_parameters()), "lr": lr, "name": "backbone"},
                {"named_params": list(self.head.named_parameters()), "lr": lr * factor, "name": "head"}]


def test_multiply_head_lr_reaches_the_model_and_warns_when_nothing_reads_it(tmp_path):
    Trainer("head", tmp_path).train(model=HeadLR(), train_loader=make_loader(), training_params=quiet_params(
        max_epochs=1, multiply_head_lr=10.0, optimizer_params={"weight_decay": 0.0, "momentum": 0.0}))
    groups = read_checkpoint(only_run(tmp_path / "head") / "ckpt_latest.pth")["optimizer_state_dict"]["param_groups"]
    assert [g["lr"] for g in groups] == pytest.approx([0.1, 1.0])
    with pytest.warns(UserWarning, match="multiply_head_lr=10.0 has no effect: Sequential defines no"):
        Trainer("head2", tmp_path).train(model=make_model(), train_loader=make_loader(), training_params=quiet_params(
            max_epochs=1, multiply_head_lr=10.0, static_assigner_end_epoch=150))


def test_initial_lr_zero_is_valid_and_freezes_nothing(tmp_path):
    model = make_model()
    before = [p.detach().clone() for p in model.parameters()]
    Trainer("zero", tmp_path).train(model=model, train_loader=make_loader(), training_params=quiet_params(
        max_epochs=1, initial_lr=0))
    assert all(p.requires_grad for p in model.parameters())
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))  # lr 0: no step moves them
    with pytest.raises(ValueError, match="initial_lr: must be a number >= 0"):
        resolve_training_params(quiet_params(initial_lr=-0.1))
    assert resolve_training_params(quiet_params(resume=None)).resume is False  # SG's `resume:` left empty


def test_load_opt_params_false_resumes_the_weights_with_a_fresh_optimizer(tmp_path):
    def train(**overrides):
        return Trainer("opt", tmp_path).train(model=make_model(), train_loader=make_loader(),
                                              training_params=quiet_params(**overrides))

    train(max_epochs=1, optimizer="SGD")
    with pytest.raises(CheckpointError):  # the default: the checkpoint's SGD state does not fit an Adam
        train(max_epochs=2, optimizer="Adam", resume=True)
    result = train(max_epochs=2, optimizer="Adam", resume=True, load_opt_params=False)
    state = read_checkpoint(only_run(tmp_path / "opt") / "ckpt_latest.pth")
    assert len(result.history) == 2 and state["optimizer_type"] == "Adam"
    assert all(int(s["step"]) == 8 for s in state["optimizer_state_dict"]["state"].values())  # epoch 2's 8 steps only


# ---- variable_setup shortcuts and Hydra callbacks ----------------------------------------------------------------

def test_recipe_shortcuts_apply_as_sgs_callback_and_twice_is_once():
    cfg = OmegaConf.create({"lr": 0.5, "batch_size": None, "epochs": None, "num_workers": 2,
                            "training_hyperparams": {"initial_lr": 0.1, "max_epochs": 7},
                            "dataset_params": {"train_dataloader_params": {"batch_size": 16, "num_workers": 0},
                                               "val_dataloader_params": {"num_workers": 0}}})
    sg_compat.apply_recipe_shortcuts(cfg)
    again = OmegaConf.create(OmegaConf.to_container(cfg))
    sg_compat.apply_recipe_shortcuts(again)
    assert cfg == again
    assert cfg.training_hyperparams.initial_lr == 0.5 and cfg.batch_size == 16 and cfg.epochs == 7
    assert cfg.dataset_params.train_dataloader_params.num_workers == cfg.dataset_params.val_dataloader_params.num_workers == 2
    assert "val_batch_size" not in cfg  # a shortcut the recipe does not have is left alone


def test_hydra_callbacks_into_super_gradients_point_at_equivalents_or_fail_naming_the_path():
    shortcuts = OmegaConf.create({"hydra": {"callbacks": {"shortcuts_cb": {
        "_target_": "super_gradients.common.environment.omegaconf_utils.RecipeShortcutsCallback"}}}})
    assert sg_compat.hydra_callback_overrides(lambda: shortcuts) == [
        "hydra.callbacks.shortcuts_cb._target_=super_trainer.sg_compat.RecipeShortcutsCallback"]
    other = OmegaConf.create({"hydra": {"callbacks": {"x": {"_target_": "super_gradients.common.NoSuchCallback"}}}})
    with pytest.raises(ValueError, match="'super_gradients.common.NoSuchCallback'"):
        sg_compat.hydra_callback_overrides(lambda: other)
    assert sg_compat.hydra_callback_overrides(lambda: None) == []


def test_sgs_resolvers_are_registered_for_recipes():
    sg_compat.register_resolvers()
    cfg = OmegaConf.create({"ckpt_root_dir": None, "experiment_name": "e", "n": 3,
                            "out": "${hydra_output_dir:${ckpt_root_dir}, ${experiment_name}}", "sum": "${add:1,2,${n}}",
                            "prod": "${mul:2,3}", "last": "${last:[1,2,5]}"})
    assert (cfg.out, cfg.sum, cfg.prod, cfg.last) == ("checkpoints/e", 6, 6, 5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sg_compat.register_resolvers()  # a second call changes nothing


class DetectionMetricsSignature(Metric):
    """SG's DetectionMetrics takes ``update(preds, target, device, inputs, crowd_targets=None)``: SG's
    MetricsUpdateCallback calls ``update(**context.__dict__)``, so a metric reads context fields by name."""

    def __init__(self):
        super().__init__()
        self.add_state("samples", default=torch.tensor(0.0), dist_reduce_fx="sum")
        self.add_state("input_sum", default=torch.tensor(0.0), dist_reduce_fx="sum")
        self.devices = set()

    def update(self, preds, target, device, inputs, crowd_targets=None):
        assert crowd_targets is None and preds.shape[0] == target.shape[0] == inputs.shape[0]
        self.devices.add(str(device))
        self.samples += inputs.shape[0]
        self.input_sum += inputs.sum()

    def compute(self):
        return self.input_sum / self.samples


def test_a_metric_that_takes_context_fields_by_name_gets_them_like_in_sg(tmp_path):
    valid = make_loader(20, 8)
    metric = DetectionMetricsSignature()
    result = Trainer("ctx_metric", tmp_path).train(
        model=make_model(), training_params=quiet_params(
            max_epochs=1, valid_metrics_list=[metric, "Accuracy"], metric_to_watch="Accuracy"),
        train_loader=make_loader(), valid_loader=valid)
    inputs = torch.cat([x for x, _ in valid])
    assert result.metrics["DetectionMetricsSignature"] == pytest.approx(float(inputs.sum() / len(inputs)), rel=1e-6)
    assert metric.devices == {"cpu"}  # the Trainer's device, from context.device
