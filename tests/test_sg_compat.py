"""SuperGradients compatibility (SPEC §7): SG-shaped recipes train unchanged; SG keys are implemented, accepted
when off, or refused all at once; SG's optimizer defaults, RMSpropTF, smooth_eps, phases and EarlyStop."""
from __future__ import annotations

import logging
import math
import shutil

import numpy as np
import pytest
import torch
import torch.nn as nn
import yaml

from conftest import make_loader, make_model, quiet_params
from super_trainer import Callback, Phase, PhaseCallback, Trainer
from super_trainer.building import build_lr_callbacks, builtin_callbacks
from super_trainer.losses import build_criterion
from super_trainer.optimizers import build_optimizer
from super_trainer.callbacks import EarlyStop, TensorBoardLogger
from super_trainer.callbacks.base import PhaseContext, parse_phase
from super_trainer.callbacks.early_stop import MissingMonitorError
from super_trainer.callbacks.lr import LinearBatchLRWarmup, LinearEpochLRWarmup
from super_trainer.checkpoint import read_checkpoint
from super_trainer.optimizers import RMSpropTF
from super_trainer.params import TrainingParams, resolve_training_params

# The keys and values of SuperGradients 3.7's training_hyperparams/default_train_params.yaml (written here as
# data; lr_updates is a _target_ node there too, which instantiate turns into an empty list).
SG_DEFAULTS = {
    "resume": False, "run_id": None, "resume_path": None, "resume_from_remote_sg_logger": False,
    "ckpt_name": "ckpt_latest.pth", "lr_mode": None, "lr_schedule_function": None, "lr_warmup_epochs": 0,
    "lr_warmup_steps": 0, "lr_cooldown_epochs": 0, "warmup_initial_lr": None, "step_lr_update_freq": None,
    "cosine_final_lr_ratio": 0.01, "warmup_mode": "LinearEpochLRWarmup",
    "lr_updates": {"_target_": "builtins.list"}, "pre_prediction_callback": None, "optimizer": "SGD",
    "optimizer_params": {}, "load_opt_params": True, "zero_weight_decay_on_bias_and_bn": False, "loss": None,
    "criterion_params": {}, "ema": False, "ema_params": {"decay": 0.9999, "decay_type": "exp", "beta": 15},
    "train_metrics_list": [], "valid_metrics_list": [], "metric_to_watch": "Accuracy",
    "greater_metric_to_watch_is_better": True, "launch_tensorboard": False, "tensorboard_port": None,
    "tb_files_user_prompt": False, "save_tensorboard_to_s3": False, "precise_bn": False,
    "precise_bn_batch_size": None, "sync_bn": False, "silent_mode": False, "mixed_precision": False,
    "save_ckpt_epoch_list": [], "average_best_models": True, "dataset_statistics": False, "batch_accumulate": 1,
    "run_validation_freq": 1, "run_test_freq": 1, "save_model": True, "seed": 42, "phase_callbacks": [],
    "log_installed_packages": True, "clip_grad_norm": None, "ckpt_best_name": "ckpt_best.pth",
    "max_train_batches": None, "max_valid_batches": None, "sg_logger": "base_sg_logger",
    "sg_logger_params": {"tb_files_user_prompt": False, "launch_tensorboard": False, "tensorboard_port": None,
                         "save_checkpoints_remote": False, "save_tensorboard_remote": False,
                         "save_logs_remote": False, "monitor_system": True},
    "torch_compile": False, "torch_compile_loss": False,
    "torch_compile_options": {"mode": "reduce-overhead", "fullgraph": False, "dynamic": False,
                              "backend": "inductor", "options": None, "disable": False},
    "finetune": False, "_convert_": "all",
}


def test_recipe_in_sg_layout_trains_with_only_model_loss_metric_overrides(tmp_path):
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    group = tmp_path / "conf" / "training_hyperparams"
    group.mkdir(parents=True)
    (group / "default_train_params.yaml").write_text(yaml.safe_dump(SG_DEFAULTS, sort_keys=False))
    (group / "tiny_step_train_params.yaml").write_text(yaml.safe_dump({  # shaped like SG's cifar10 recipe
        "defaults": ["default_train_params"], "max_epochs": 2, "initial_lr": 0.1, "lr_mode": "StepLRScheduler",
        "lr_updates": {"_target_": "numpy.arange", "start": 0, "stop": 1, "step": 1}, "lr_decay_factor": 0.1,
        "_convert_": "all"}, sort_keys=False))
    (tmp_path / "conf" / "tiny_recipe.yaml").write_text(yaml.safe_dump({
        "defaults": [{"training_hyperparams": "tiny_step_train_params"}, "_self_"],
        "training_hyperparams": {"loss": "CrossEntropyLoss", "train_metrics_list": ["Accuracy"],
                                 "valid_metrics_list": ["Accuracy", "Top5"]}}, sort_keys=False))
    with initialize_config_dir(config_dir=str(tmp_path / "conf"), version_base="1.3"):
        cfg = compose(config_name="tiny_recipe")
    training_params = instantiate(cfg.training_hyperparams)
    assert isinstance(training_params["lr_updates"], np.ndarray)  # SG's numpy lr_updates reach us as such

    result = Trainer("sg", tmp_path / "ck", device="cpu").train(
        model=make_model(classes=6), training_params=training_params, train_loader=make_loader(classes=6),
        valid_loader=make_loader(16, classes=6))
    assert result.stop_reason == "completed" and len(result.history) == 2
    assert [h["lr"] for h in result.history] == pytest.approx([0.1, 0.01])  # the update at epoch 0 decays epoch 1
    names = {p.name for p in (tmp_path / "ck" / "sg").iterdir()}
    assert {"ckpt_latest.pth", "ckpt_best.pth", "average_model.pth", "experiment.log"} <= names
    assert any(n.startswith("events.out.tfevents") for n in names)  # base_sg_logger: TensorBoard + experiment.log
    group0 = read_checkpoint(tmp_path / "ck" / "sg" / "ckpt_latest.pth")["optimizer_state_dict"]["param_groups"][0]
    assert (group0["momentum"], group0["weight_decay"]) == (0.9, 1e-4)  # SG's SGD defaults: the recipe gave none


def test_unsupported_sg_values_raise_one_error_listing_all(tmp_path):
    with pytest.raises(ValueError) as info:
        resolve_training_params(quiet_params(precise_bn=True, launch_tensorboard=True, finetune=True,
                                             load_opt_params=True, dataset_statistics=False))
    message = str(info.value)
    assert "SuperGradients keys are not supported" in message
    for key in ("precise_bn=True", "launch_tensorboard=True", "finetune=True"):
        assert key in message
    assert "load_opt_params" not in message and "dataset_statistics" not in message  # their off values pass


def test_unknown_key_hints_only_close_matches():
    with pytest.raises(ValueError, match="unknown key 'max_epoch'; did you mean 'max_epochs'"):
        resolve_training_params(quiet_params(max_epoch=3))
    with pytest.raises(ValueError) as info:
        resolve_training_params(quiet_params(precise_bn_batch=3))
    assert "did you mean" not in str(info.value) and "resume_path" not in str(info.value)
    with pytest.raises(ValueError, match="unknown keys 'aaa', 'bbb'"):  # all unknown keys at once
        resolve_training_params(quiet_params(aaa=1, bbb=2))


@pytest.mark.parametrize("updates, expected", [
    ([2, 4], [2, 4]), ((2, 4), [2, 4]), (np.arange(2, 6, 2), [2, 4]), ([np.int64(3)], [3]), (None, []),
    ({"_target_": "numpy.arange", "start": 2, "stop": 6, "step": 2}, [2, 4]),  # a recipe not instantiated first
])
def test_lr_updates_accept_integral_sequences(updates, expected):
    params = resolve_training_params(quiet_params(max_epochs=6, lr_mode="step", lr_updates=updates))
    assert params.lr_updates == expected and all(type(u) is int for u in params.lr_updates)


def test_fractional_lr_updates_count_as_sg_compares_them(tmp_path):
    """SG's mobilenetv2 recipe decays at numpy.arange(2.4, 450, 2.4): epoch E has passed every u <= E."""
    params = resolve_training_params(quiet_params(max_epochs=6, lr_mode="step", lr_decay_factor=0.5,
                                                  lr_updates={"_target_": "numpy.arange", "start": 2.4, "stop": 6,
                                                              "step": 2.4}))
    assert params.lr_updates == pytest.approx([2.4, 4.8])
    result = Trainer("frac", tmp_path, device="cpu").train(
        model=make_model(), training_params=params, train_loader=make_loader(16), valid_loader=make_loader(16))
    # a decay applies from the epoch after the first E >= u: u=2.4 -> E=3 decays epoch 4; u=4.8 -> E=5 (none left)
    assert [h["lr"] for h in result.history] == pytest.approx([0.1, 0.1, 0.1, 0.1, 0.05, 0.05])


@pytest.mark.parametrize("updates", ["2,4", [-1], {"a": 1}, 3, [float("nan")], [True]])
def test_bad_lr_updates_name_the_key(updates):
    with pytest.raises(ValueError, match="training_params.lr_updates"):
        resolve_training_params(quiet_params(lr_mode="step", lr_updates=updates))


def test_step_lr_update_freq_as_sg_computes_it():
    params = resolve_training_params(quiet_params(max_epochs=12, lr_mode="StepLRScheduler", step_lr_update_freq=2.4,
                                                  lr_warmup_epochs=1, lr_cooldown_epochs=2))
    assert params.lr_updates == [3, 5, 8]  # ceil(2.4·x) within [W, M − C) = [1, 10)
    with pytest.raises(ValueError, match="mutually exclusive"):
        resolve_training_params(quiet_params(lr_mode="step", step_lr_update_freq=2, lr_updates=[1]))


def test_warmup_mode_without_warmup_is_no_warmup_and_sg_names_are_aliases():
    params = resolve_training_params(quiet_params(warmup_mode="LinearEpochLRWarmup"))
    assert params.warmup_mode == "linear_epoch_step" and build_lr_callbacks(params, 8) == []
    params = resolve_training_params(quiet_params(warmup_mode="LinearBatchLRWarmup", lr_warmup_steps=4))
    assert [type(cb) for cb in build_lr_callbacks(params, 8)] == [LinearBatchLRWarmup]
    params = resolve_training_params(quiet_params(max_epochs=3, warmup_mode="LinearEpochLRWarmup", lr_warmup_epochs=1))
    assert [type(cb) for cb in build_lr_callbacks(params, 8)] == [LinearEpochLRWarmup]


def test_sg_optimizer_defaults_reach_the_optimizer():
    def group(**overrides):
        params = resolve_training_params(quiet_params(**overrides))
        return build_optimizer(make_model(), params).param_groups[0], params

    sgd, params = group()
    assert (sgd["momentum"], sgd["weight_decay"]) == (0.9, 1e-4)
    assert params.optimizer_params == {"weight_decay": 1e-4, "momentum": 0.9}  # visible in training_params.yaml
    sgd, _ = group(optimizer_params={"momentum": 0.0})
    assert (sgd["momentum"], sgd["weight_decay"]) == (0.0, 1e-4)  # the recipe's value wins
    adam, _ = group(optimizer="Adam")
    assert adam["weight_decay"] == 1e-4
    rms, _ = group(optimizer="RMSpropTF")
    assert isinstance(rms["params"][0], torch.Tensor) and (rms["momentum"], rms["weight_decay"]) == (0.9, 1e-4)
    adamw, _ = group(optimizer="AdamW")
    assert adamw["weight_decay"] == 0.01  # no SG default for AdamW: torch's own


def test_rmsproptf_matches_a_hand_computed_step():
    p0, g = [1.0, -2.0], [0.5, -3.0]
    lr, alpha, eps, momentum, wd = 0.1, 0.9, 1e-3, 0.9, 0.01
    param = torch.tensor(p0, dtype=torch.float64, requires_grad=True)
    opt = RMSpropTF([param], lr=lr, alpha=alpha, eps=eps, momentum=momentum, weight_decay=wd)
    expected, v, buf = list(p0), [1.0, 1.0], [0.0, 0.0]  # TF: the square average starts at ones
    for _ in range(2):
        param.grad = torch.tensor(g, dtype=torch.float64)
        opt.step()
        for i in range(2):
            grad = g[i] + wd * expected[i]
            v[i] += (1 - alpha) * (grad * grad - v[i])
            buf[i] = momentum * buf[i] + lr * grad / math.sqrt(v[i] + eps)  # eps inside the sqrt, lr in the buffer
            expected[i] -= buf[i]
    assert param.detach().tolist() == pytest.approx(expected, rel=1e-12)
    torch_param = torch.tensor(p0, dtype=torch.float64, requires_grad=True)
    torch_opt = torch.optim.RMSprop([torch_param], lr=lr, alpha=alpha, eps=eps, momentum=momentum, weight_decay=wd)
    for _ in range(2):
        torch_param.grad = torch.tensor(g, dtype=torch.float64)
        torch_opt.step()
    assert torch_param.detach().tolist() != pytest.approx(expected, rel=1e-3)  # it is not torch's RMSprop


def test_smooth_eps_is_label_smoothing_and_sg_loss_names():
    logits = torch.tensor([[2.0, 0.5, -1.0], [0.1, 0.2, 0.3]])
    target = torch.tensor([0, 2])
    eps = 0.1
    lsm = logits.log_softmax(-1)
    expected = -((1 - eps) * lsm.gather(1, target[:, None]).squeeze(1) + eps * lsm.mean(-1)).mean()
    for name in ("CrossEntropyLoss", "cross_entropy"):
        criterion = build_criterion({"loss": name, "criterion_params": {"smooth_eps": eps}}, torch.device("cpu"))
        assert criterion(logits, target).item() == pytest.approx(expected.item(), rel=1e-6)
    plain = build_criterion({"loss": "cross_entropy", "criterion_params": {"smooth_eps": None}}, torch.device("cpu"))
    assert plain(logits, target).item() == pytest.approx(nn.functional.cross_entropy(logits, target).item())
    with pytest.raises(ValueError, match="smooth_dist"):
        build_criterion({"loss": "CrossEntropyLoss", "criterion_params": {"smooth_dist": [0.5, 0.5]}}, "cpu")


def test_sg_logger_params_feed_the_logger_and_the_rest_is_logged(tmp_path, caplog):
    params = resolve_training_params(quiet_params(sg_logger="base_sg_logger", sg_logger_params={
        "flush_secs": 5, "launch_tensorboard": False, "save_checkpoints_remote": True}))
    with caplog.at_level(logging.INFO, logger="super_trainer"):
        (tb,) = [cb for cb in builtin_callbacks(params, 8, tmp_path) if isinstance(cb, TensorBoardLogger)]
    assert tb.flush_secs == 5
    record = [r for r in caplog.records if "sg_logger_params" in r.getMessage()][0]
    assert "launch_tensorboard" in record.getMessage() and "save_checkpoints_remote" in record.getMessage()
    assert record.levelno == logging.WARNING  # a remote upload asked for and not done: a warning, not info


def test_save_model_false_writes_no_checkpoint(tmp_path):
    result = Trainer("nosave", tmp_path, device="cpu").train(
        model=make_model(), training_params=quiet_params(save_model=False, average_best_models=True,
                                                          save_ckpt_epoch_list=[1]),
        train_loader=make_loader(), valid_loader=make_loader(16))
    assert result.latest_ckpt_path is None and result.best_ckpt_path is None
    assert not list((tmp_path / "nosave").glob("*.pth"))


def test_ckpt_best_name_and_resume_from_ckpt_name(tmp_path):
    def run(**overrides):
        return Trainer("names", tmp_path, device="cpu").train(
            model=make_model(), training_params=quiet_params(**overrides), train_loader=make_loader(),
            valid_loader=make_loader(16))

    first = run(max_epochs=1, ckpt_best_name="best_acc.pth")
    assert first.best_ckpt_path.endswith("best_acc.pth") and not (tmp_path / "names" / "ckpt_best.pth").exists()
    shutil.move(tmp_path / "names" / "ckpt_latest.pth", tmp_path / "names" / "after_epoch_1.pth")
    resumed = run(max_epochs=2, resume=True, ckpt_name="after_epoch_1.pth")  # SG: the file resume reads
    assert [h["epoch"] for h in resumed.history] == [0, 1]
    assert resumed.history[0] == first.history[0]  # epoch 0 came from the named checkpoint


def test_sync_bn_on_one_process_is_a_logged_no_op(tmp_path, caplog):
    model = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 3))
    with caplog.at_level(logging.INFO, logger="super_trainer"):
        result = Trainer("bn", tmp_path, device="cpu").train(
            model=model, training_params=quiet_params(max_epochs=1, sync_bn=True), train_loader=make_loader())
    assert result.stop_reason == "completed" and type(model[1]) is nn.BatchNorm1d
    assert any("sync_bn" in r.getMessage() for r in caplog.records)


def test_torch_compile_trains_the_compiled_module_and_saves_plain_weights(tmp_path):
    try:
        torch.compile(nn.Linear(2, 2), backend="eager")(torch.zeros(1, 2))
    except Exception as err:  # pragma: no cover - depends on the platform
        pytest.skip(f"torch.compile does not work here: {err}")
    graphs = []

    def counting_backend(gm, example_inputs):  # a torch.compile backend: runs the captured graph as is
        graphs.append(gm)
        return gm.forward

    class Watch(Callback):
        nets = []

        def on_train_batch_loss_end(self, context):
            self.nets.append(context.net)

    model = make_model()
    before = [p.detach().clone() for p in model.parameters()]
    watch = Watch()
    result = Trainer("compiled", tmp_path, device="cpu").train(
        model=model, training_params=quiet_params(max_epochs=1, torch_compile=True, phase_callbacks=[watch],
                                                  batch_accumulate=2,  # no DDP no_sync on a compiled net
                                                  torch_compile_options={"backend": counting_backend}),
        train_loader=make_loader(), valid_loader=make_loader(16))
    assert graphs, "the compiled wrapper's forward never ran"
    assert all(getattr(net, "_orig_mod", None) is model for net in watch.nets)  # context.net: what the forward uses
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))  # the user's model was trained
    keys = read_checkpoint(result.latest_ckpt_path)["net"].keys()
    assert keys == model.state_dict().keys() and not any("_orig_mod" in k for k in keys)

    torch._dynamo.reset()  # forget the graphs cached for this code, so the next compile calls the backend again
    compiled = torch.compile(make_model(), backend=counting_backend)  # a model passed in compiled stays compiled
    graphs.clear()
    Watch.nets = []
    Trainer("given", tmp_path, device="cpu").train(
        model=compiled, training_params=quiet_params(max_epochs=1, phase_callbacks=[Watch()]),
        train_loader=make_loader())
    assert graphs and all(net is compiled for net in Watch.nets)


def test_phase_accepts_phase_name_and_dotted_name(tmp_path):
    assert parse_phase(Phase.TRAIN_EPOCH_END) is Phase.TRAIN_EPOCH_END
    assert parse_phase("train_epoch_end") is Phase.TRAIN_EPOCH_END
    assert parse_phase("Phase.TRAIN_EPOCH_END") is Phase.TRAIN_EPOCH_END
    with pytest.raises(ValueError, match="unknown phase 'Phase.NOPE'"):
        parse_phase("Phase.NOPE")

    class Count(PhaseCallback):
        calls = 0

        def __call__(self, context):
            Count.calls += 1

    result = Trainer("phase", tmp_path, device="cpu").train(model=make_model(), training_params=quiet_params(
        max_epochs=2, phase_callbacks=[Count("Phase.TRAIN_EPOCH_END")],
        lr_mode={"StepLR": {"step_size": 1, "gamma": 0.5, "phase": "Phase.TRAIN_EPOCH_END"}}),  # as YAML gives it
        train_loader=make_loader())
    assert Count.calls == 2 and [h["lr"] for h in result.history] == pytest.approx([0.1, 0.05])


def feed(callback, values, steps=None):
    context = PhaseContext(metric_to_watch="Acc",
                           training_params=TrainingParams(greater_metric_to_watch_is_better=True))
    callback.on_training_start(context)
    event = getattr(callback, {Phase.VALIDATION_EPOCH_END: "on_validation_loader_end",
                               Phase.TRAIN_EPOCH_END: "on_train_loader_end"}[callback.phase])
    for check, value in enumerate(values):
        context.update_context(epoch=check, global_step=(steps or range(0, 1000, 10))[check],
                               metrics_dict={"loss": value})
        event(context)
        if context.stop_training:
            assert context.stop_reason == "early_stop"
            return check
    return None


def test_early_stop_with_sg_signature_and_decisions():
    # SG's positional signature; mode "min" by default for a named monitor
    assert feed(EarlyStop(Phase.VALIDATION_EPOCH_END, "loss", patience=2), [1.0, 0.9, 0.95, 0.91]) == 3
    assert feed(EarlyStop("Phase.TRAIN_EPOCH_END", "loss", patience=2), [1.0, 0.9, 0.95, 0.91]) == 3
    assert feed(EarlyStop(Phase.VALIDATION_EPOCH_END, "loss", min_delta=0.05), [1.0, 0.97, 0.96, 0.955]) == 3
    assert feed(EarlyStop(Phase.VALIDATION_EPOCH_END, "loss", threshold=0.5, patience=9), [1.0, 0.6, 0.4]) == 2
    assert feed(EarlyStop(Phase.VALIDATION_EPOCH_END, "loss", mode="max", threshold=0.5), [0.1, 0.6]) == 1
    assert feed(EarlyStop(Phase.VALIDATION_EPOCH_END, "loss", patience=9), [1.0, math.inf]) == 1
    assert feed(EarlyStop(Phase.VALIDATION_EPOCH_END, "loss", patience=9, check_finite=False), [1.0, math.nan]) is None
    with pytest.raises(ValueError, match="phase TRAIN_BATCH_END is not supported"):
        EarlyStop(Phase.TRAIN_BATCH_END, "loss")


def test_early_stop_strict_and_the_otx_extensions(caplog):
    context = PhaseContext(metrics_dict={"other": 1.0}, global_step=0)
    with pytest.raises(MissingMonitorError, match="'loss' is not in metrics_dict") as info:
        EarlyStop(Phase.VALIDATION_EPOCH_END, "loss").on_validation_loader_end(context)
    assert isinstance(info.value, RuntimeError)  # SG raises RuntimeError; ours is also a ValueError
    with caplog.at_level(logging.WARNING, logger="super_trainer"):
        EarlyStop(Phase.VALIDATION_EPOCH_END, "loss", strict=False).on_validation_loader_end(context)
    assert not context.stop_training and "strict=False" in caplog.text
    # iteration_patience: 2 checks without improvement, but only after 25 steps since the last improvement
    stopper = EarlyStop(Phase.VALIDATION_EPOCH_END, "loss", patience=2, iteration_patience=25)
    assert feed(stopper, [1.0, 1.0, 1.0, 1.0, 1.0]) == 3  # steps 0, 10, 20 (too soon), 30: stop
    # min_delta_ratio: improvements smaller than 10 % of the value do not count
    assert feed(EarlyStop(Phase.VALIDATION_EPOCH_END, "loss", patience=2, min_delta_ratio=0.1),
                [1.0, 0.95, 0.85, 0.8, 0.79]) == 4  # 0.95 and 0.8 are no gain; 0.85 is


def test_early_stop_from_yaml_spec_stops_training_and_checkpoints_its_state(tmp_path):
    spec = yaml.safe_load("EarlyStop: {phase: Phase.VALIDATION_EPOCH_END, monitor: Accuracy, mode: max, "
                          "threshold: -1.0, iteration_patience: 0}")
    result = Trainer("es", tmp_path, device="cpu").train(
        model=make_model(), training_params=quiet_params(max_epochs=5, phase_callbacks=[spec]),
        train_loader=make_loader(), valid_loader=make_loader(16))
    assert result.stop_reason == "early_stop" and len(result.history) == 1  # accuracy > -1 at once
    state = read_checkpoint(result.latest_ckpt_path)["callbacks"]["EarlyStop"]
    assert set(state) == {"best", "bad_validations", "last_improvement_step"}


def test_pre_prediction_callback_changes_the_train_batch(tmp_path):
    seen = []

    class Look(Callback):
        def on_train_batch_start(self, context):
            seen.append(float(context.inputs.abs().sum()))

    def zero_inputs(inputs, targets, batch_idx):
        return inputs * 0, targets

    Trainer("pre", tmp_path, device="cpu").train(model=make_model(), training_params=quiet_params(
        max_epochs=1, pre_prediction_callback=zero_inputs, phase_callbacks=[Look()]), train_loader=make_loader())
    assert seen and all(s == 0.0 for s in seen)
