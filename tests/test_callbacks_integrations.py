"""Callbacks that talk to other systems (issue 6): images in the loggers, ONNX export check, mmcv hooks,
SAM, and EMA's start_step / interval."""
from __future__ import annotations

import copy
import sys

import numpy as np
import pytest
import torch
import torch.nn as nn
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.utils.data import DataLoader, TensorDataset

from conftest import make_loader, make_model, quiet_params
from super_trainer import Callback, Trainer
from super_trainer.callbacks import BatchVisualizationCallback, MMCVHookAdapter
from super_trainer.images import make_grid, read_png, write_png
from super_trainer.sam import SAM


# ---- images through the loggers; BatchVisualizationCallback -------------------------------------------

def image_loader(n=16, batch_size=8, seed=0):
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(n, 3, 6, 5, generator=generator)
    return DataLoader(TensorDataset(images, torch.arange(n) % 3), batch_size=batch_size)


def image_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(3 * 6 * 5, 3))


def train_images(tmp_path, name, callbacks, sg_logger, max_epochs=2):
    return Trainer(name, tmp_path).train(
        model=image_model(), training_params=quiet_params(max_epochs=max_epochs, sg_logger=sg_logger,
                                                          phase_callbacks=callbacks),
        train_loader=image_loader(), valid_loader=image_loader(8))


def expected_cell(image):
    """The image scaled to [0, 1] by its min and max, as 8-bit HWC."""
    scaled = ((image - image.min()) / (image.max() - image.min())).numpy()
    return np.round(scaled * 255).astype(np.uint8).transpose(1, 2, 0)


def test_png_writer_round_trip(tmp_path):
    image = (np.arange(5 * 7 * 3) % 256).astype(np.uint8).reshape(5, 7, 3)
    write_png(tmp_path / "a.png", image)
    assert np.array_equal(read_png(tmp_path / "a.png"), image)
    pytest.importorskip("PIL")
    from PIL import Image  # an independent decoder agrees

    assert np.array_equal(np.asarray(Image.open(tmp_path / "a.png")), image)


def test_batch_visualization_base_logger_writes_pngs(tmp_path):
    train_images(tmp_path, "viz", [BatchVisualizationCallback("train", freq=1, max_images=4)], "base")
    folder = tmp_path / "viz" / "images"
    assert sorted(p.name for p in folder.iterdir()) == ["Train_batch_0_0.png", "Train_batch_0_1.png"]
    grid = read_png(folder / "Train_batch_0_0.png")
    assert grid.shape == (2 * (6 + 2) + 2, 2 * (5 + 2) + 2, 3)  # 4 images in a 2x2 grid, padding 2
    first = next(iter(image_loader()))[0]
    assert np.array_equal(grid[2:8, 2:7], expected_cell(first[0]))  # top-left cell: the first input
    assert np.array_equal(grid[10:16, 9:14], expected_cell(first[3]))  # bottom-right: the fourth
    assert "image Train/batch_0 (step 1)" in (tmp_path / "viz" / "experiment.log").read_text()


def test_batch_visualization_and_histogram_in_tensorboard(tmp_path):
    class Histogram(Callback):
        def on_train_loader_end(self, context):
            context.sg_logger.add_histogram("weights/0", context.net[1].weight, context.epoch)

    train_images(tmp_path, "tbviz", [BatchVisualizationCallback("valid", freq=2, max_images=3), Histogram()],
                 "tensorboard", max_epochs=3)
    events = EventAccumulator(str(tmp_path / "tbviz"), size_guidance={"images": 0, "histograms": 0})
    events.Reload()
    images = events.Images("Valid/batch_0")
    assert [e.step for e in images] == [0, 2]  # freq=2: epochs 0 and 2
    assert (images[0].height, images[0].width) == (2 * (6 + 2) + 2, 2 * (5 + 2) + 2)  # 3 images: 2 per row, 2 rows
    histograms = events.Histograms("weights/0")
    assert [h.step for h in histograms] == [0, 1, 2]
    assert histograms[0].histogram_value.num == 3 * 90
    assert not (tmp_path / "tbviz" / "images").exists()  # TensorBoard only, no PNG copies


def test_base_logger_histogram_line_and_bad_image_message(tmp_path):
    from super_trainer.callbacks import BaseLogger

    logger = BaseLogger(log_dir=tmp_path)
    logger.add_histogram("h", torch.tensor([1.0, 2.0, 3.0]), step=4)
    with pytest.raises(ValueError, match=r"\(C, H, W\)"):
        logger.add_image("bad", torch.zeros(2, 4, 4))
    logger.close()
    assert "histogram h (step 4): count=3 min=1 max=3 mean=2" in (tmp_path / "experiment.log").read_text()


def test_visualization_errors_are_clear(tmp_path):
    with pytest.raises(ValueError, match="N, C, H, W"):
        make_grid(torch.zeros(4, 8))
    with pytest.raises(ValueError, match="phase"):
        BatchVisualizationCallback("eval")

    class ScalarsOnly:
        def add_scalar(self, tag, value, step):
            pass

    with pytest.raises(ValueError, match="has no add_images"):
        train_images(tmp_path, "noimg", [BatchVisualizationCallback()], ScalarsOnly(), max_epochs=1)


# ---- ModelConversionCheckCallback ----------------------------------------------------------------------

def test_model_conversion_check_without_onnx_says_how_to_install(monkeypatch):
    from super_trainer.callbacks import ModelConversionCheckCallback

    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import onnxruntime now raises ImportError
    with pytest.raises(ImportError, match=r"super-trainer\[onnx\]"):
        ModelConversionCheckCallback(input_dimensions=(8,))


def test_model_conversion_check_passes_and_leaves_training_unchanged(tmp_path):
    pytest.importorskip("onnxruntime", reason="the [onnx] extra is not installed")
    from super_trainer.callbacks import ModelConversionCheckCallback

    check = ModelConversionCheckCallback(primary_batch_size=2)  # input shape from train_loader.dataset[0]
    checked = make_model()
    Trainer("onnx", tmp_path).train(model=checked, training_params=quiet_params(max_epochs=1, phase_callbacks=[check]),
                                    train_loader=make_loader(16, 8, shuffle=True), valid_loader=make_loader(8))
    assert check.max_abs_diff is not None and check.max_abs_diff < 1e-5
    plain = make_model()
    Trainer("plain", tmp_path).train(model=plain, training_params=quiet_params(max_epochs=1),
                                     train_loader=make_loader(16, 8, shuffle=True), valid_loader=make_loader(8))
    for key, value in plain.state_dict().items():  # the check draws no random numbers from the run's RNG
        assert torch.equal(value, checked.state_dict()[key])


def test_model_conversion_check_catches_a_model_that_exports_differently(tmp_path):
    pytest.importorskip("onnxruntime", reason="the [onnx] extra is not installed")
    from super_trainer.callbacks import ModelConversionCheckCallback

    class CountsCalls(nn.Module):
        """Python state the tracer bakes in as a constant: torch and ONNX outputs disagree."""

        def __init__(self):
            super().__init__()
            self.linear = nn.Linear(8, 3)
            self.calls = 0

        def forward(self, x):
            self.calls += 1
            return self.linear(x) * self.calls

    with pytest.raises(RuntimeError, match=r"\(counter\): onnxruntime output differs from torch's"):
        Trainer("onnx_bad", tmp_path).train(
            model=CountsCalls(), training_params=quiet_params(
                max_epochs=1, phase_callbacks=[{"ModelConversionCheckCallback": {  # SG's arguments, by name
                    "model_name": "counter", "input_dimensions": [8], "primary_batch_size": 4,
                    "do_constant_folding": True, "output_names": ["output"]}}]),
            train_loader=make_loader(16, 8), valid_loader=make_loader(8))


# ---- MMCVHookAdapter -----------------------------------------------------------------------------------

class OTXStyleHook:
    """An mmcv-style hook as OTX writes them: a plain class, unchanged, reading the runner."""

    def __init__(self, stop_at_epoch=None):
        self.calls = []
        self.stop_at_epoch = stop_at_epoch

    def _log(self, name, runner):
        self.calls.append((name, runner.epoch, runner.iter, runner.inner_iter))

    def before_run(self, runner):
        self.calls.append(("before_run", runner.max_epochs, runner.max_iters, runner.rank))

    def before_train_epoch(self, runner):
        self._log("before_train_epoch", runner)

    def before_train_iter(self, runner):
        self._log("before_train_iter", runner)

    def after_train_iter(self, runner):
        assert runner.outputs["num_samples"] == 8 and runner.outputs["loss"].requires_grad
        self._log("after_train_iter", runner)

    def after_train_epoch(self, runner):
        self._log("after_train_epoch", runner)
        if runner.epoch == self.stop_at_epoch:
            runner.should_stop = True

    def before_val_epoch(self, runner):
        self._log("before_val_epoch", runner)

    def after_val_epoch(self, runner):
        self._log("after_val_epoch", runner)

    def after_run(self, runner):
        self.calls.append(("after_run", runner.iter, runner.current_lr()))


def mmcv_expected_order(epochs, iters_per_epoch):
    """mmcv's EpochBasedRunner with workflow [('train', 1), ('val', 1)]: runner.iter counts train iterations
    and grows after after_train_iter; runner.inner_iter is the batch index in the epoch."""
    calls, it = [("before_run", 3, 3 * iters_per_epoch, 0)], 0
    for epoch in range(epochs):
        calls.append(("before_train_epoch", epoch, it, 0))
        for inner in range(iters_per_epoch):
            calls += [("before_train_iter", epoch, it, inner), ("after_train_iter", epoch, it, inner)]
            it += 1
        calls.append(("after_train_epoch", epoch, it, iters_per_epoch - 1))
        # mmcv's val loop also sets inner_iter: it is the last train batch's before, the last val batch's after
        calls += [("before_val_epoch", epoch, it, iters_per_epoch - 1), ("after_val_epoch", epoch, it, 0)]
    return calls


def test_mmcv_hook_runs_unchanged_in_mmcv_call_order(tmp_path):
    hook = OTXStyleHook()
    Trainer("mmcv", tmp_path).train(model=make_model(), training_params=quiet_params(
        max_epochs=3, phase_callbacks=[MMCVHookAdapter(hook)]),
        train_loader=make_loader(16, 8), valid_loader=make_loader(8, 8))
    assert hook.calls[:-1] == mmcv_expected_order(3, 2)
    assert hook.calls[-1] == ("after_run", 6, [0.1])


class RecipeHook:
    instances = []

    def __init__(self, every):
        self.every, self.epochs = every, []
        RecipeHook.instances.append(self)

    def after_train_epoch(self, runner):
        self.epochs.append(runner.epoch)


def test_mmcv_hook_from_a_recipe_style_spec(tmp_path):
    spec = {"MMCVHookAdapter": {"hook": {"_target_": f"{__name__}.RecipeHook", "every": 2}, "priority": "LOW"}}
    Trainer("mmcv_spec", tmp_path).train(model=make_model(), training_params=quiet_params(
        max_epochs=2, phase_callbacks=[spec]), train_loader=make_loader(16, 8), valid_loader=make_loader(8))
    assert RecipeHook.instances[-1].epochs == [0, 1] and RecipeHook.instances[-1].every == 2


def test_mmcv_hook_should_stop_and_priority_names(tmp_path):
    hook = OTXStyleHook(stop_at_epoch=0)
    result = Trainer("mmcv_stop", tmp_path).train(
        model=make_model(), training_params=quiet_params(max_epochs=3, phase_callbacks=[MMCVHookAdapter(hook)]),
        train_loader=make_loader(16, 8), valid_loader=make_loader(8, 8))
    assert result.stop_reason == "stopped_by_callback" and len(result.history) == 1  # epoch 0 completes
    assert MMCVHookAdapter(hook, priority="HIGHEST").priority == 0
    assert MMCVHookAdapter(hook, priority="lowest").priority == 100
    assert MMCVHookAdapter(hook, priority="VERY_LOW").priority == 90
    hook.priority = "ABOVE_NORMAL"
    assert MMCVHookAdapter(hook).priority == 40
    with pytest.raises(ValueError, match="HIGHEST"):
        MMCVHookAdapter(hook, priority="URGENT")
    with pytest.raises(AttributeError, match="runner.log_buffer is not part of"):
        MMCVHookAdapter(hook).runner.log_buffer


def test_mmcv_hook_helpers_for_hooks_that_subclass_mmcv_hook(tmp_path):
    from super_trainer.callbacks import MMCVHook as Hook  # stands in for `from mmcv.runner import Hook`

    class EveryOtherEpoch(Hook):
        def __init__(self):
            self.marks = []

        def after_train_iter(self, runner):
            if self.end_of_epoch(runner):
                self.marks.append(("end_of_epoch", runner.iter))
            if self.is_last_iter(runner):
                self.marks.append(("last_iter", runner.iter))
            if self.every_n_iters(runner, 3):
                self.marks.append(("every_3_iters", runner.iter))

        def after_train_epoch(self, runner):
            if self.every_n_epochs(runner, 2) or self.is_last_epoch(runner):
                self.marks.append(("epoch", runner.epoch))

    hook = EveryOtherEpoch()
    adapter = MMCVHookAdapter(hook)
    assert adapter.calls.keys() == {"on_training_start", "on_train_batch_end", "on_train_loader_end"}
    Trainer("mmcv_helpers", tmp_path).train(model=make_model(), training_params=quiet_params(
        max_epochs=3, phase_callbacks=[adapter]), train_loader=make_loader(16, 8), valid_loader=make_loader(8))
    assert hook.marks == [("end_of_epoch", 1), ("every_3_iters", 2), ("end_of_epoch", 3), ("epoch", 1),
                          ("end_of_epoch", 5), ("last_iter", 5), ("every_3_iters", 5), ("epoch", 2)]


def test_mmengine_style_hook_gets_batch_idx_outputs_and_metrics(tmp_path):
    seen = []

    class MMEngineHook:
        priority = "LOW"

        def before_train(self, runner):
            seen.append("before_train")

        def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None):
            seen.append(("iter", batch_idx, round(outputs["loss"].item(), 6), tuple(data_batch[0].shape)))

        def after_val_epoch(self, runner, metrics=None):
            seen.append(("val", sorted(metrics)))

        def after_train(self, runner):
            seen.append("after_train")

    losses = []

    class Loss(Callback):
        def on_train_batch_end(self, context):
            losses.append(round(context.loss.item(), 6))

    adapter = MMCVHookAdapter(MMEngineHook())
    Trainer("mme", tmp_path).train(model=make_model(), training_params=quiet_params(
        max_epochs=1, phase_callbacks=[adapter, Loss()]), train_loader=make_loader(16, 8), valid_loader=make_loader(8))
    assert seen == ["before_train", ("iter", 0, losses[0], (8, 8)), ("iter", 1, losses[1], (8, 8)),
                    ("val", ["Accuracy", "CrossEntropyLoss"]), "after_train"]
    assert adapter.priority == 70


# ---- SAM -----------------------------------------------------------------------------------------------

def mse_grad(w, x, y):
    """d/dw mean((x @ w - y)^2), by hand."""
    return 2.0 / len(x) * x.T @ (x @ w - y)


def test_sam_step_equals_a_hand_computed_sam_update():
    torch.manual_seed(0)
    x, y = torch.randn(6, 3, dtype=torch.float64), torch.randn(6, 1, dtype=torch.float64)
    w0 = torch.randn(3, 1, dtype=torch.float64)
    lr, rho = 0.1, 0.05
    param = nn.Parameter(w0.clone())
    optimizer = SAM([param], base="SGD", rho=rho, lr=lr)

    def closure():
        optimizer.zero_grad()
        loss = ((x @ param - y) ** 2).mean()
        loss.backward()
        return loss

    closure()
    returned = optimizer.step(closure)
    g0 = mse_grad(w0, x, y)
    e = rho * g0 / g0.norm()
    expected = w0 - lr * mse_grad(w0 + e, x, y)
    assert torch.allclose(param.detach(), expected, rtol=0, atol=1e-12)
    assert returned.item() == pytest.approx(((x @ (w0 + e) - y) ** 2).mean().item())  # loss at w + e
    assert not torch.allclose(expected, w0 - lr * g0)  # plain SGD would land elsewhere


def test_sam_in_the_trainer_equals_hand_computed_sam_steps(tmp_path):
    torch.manual_seed(0)
    x, y = torch.randn(12, 3, dtype=torch.float64), torch.randn(12, 1, dtype=torch.float64)
    model = nn.Linear(3, 1, bias=False).double()
    w = model.weight.detach().clone().T  # (3, 1)
    lr, rho = 0.1, 0.05
    result = Trainer("sam", tmp_path).train(model=model, training_params=quiet_params(
        max_epochs=1, loss="MSELoss", initial_lr=lr, optimizer={"SAM": {"base": "SGD", "rho": rho}},
        optimizer_params={"momentum": 0.0, "weight_decay": 0.0}),
        train_loader=DataLoader(TensorDataset(x, y), batch_size=4))
    assert result.stop_reason == "completed"
    for start in (0, 4, 8):  # three batches, each one SAM step
        xb, yb = x[start:start + 4], y[start:start + 4]
        g = mse_grad(w, xb, yb)
        w = w - lr * mse_grad(w + rho * g / g.norm(), xb, yb)
    assert torch.allclose(model.weight.detach().T, w, rtol=0, atol=1e-12)


def test_sam_shares_param_groups_and_state_with_its_base():
    params = [nn.Parameter(torch.ones(2))]
    optimizer = SAM(params, base="SGD", rho=0.1, lr=0.5, momentum=0.9)
    assert isinstance(optimizer.base_optimizer, torch.optim.SGD)
    optimizer.param_groups[0]["lr"] = 0.25  # what an LR schedule does
    assert optimizer.base_optimizer.param_groups[0]["lr"] == 0.25
    params[0].grad = torch.ones(2)
    optimizer.step(lambda: torch.tensor(0.0))
    state = optimizer.state_dict()
    assert "momentum_buffer" in state["state"][0]  # the base optimizer's state is what gets checkpointed
    fresh = SAM([nn.Parameter(torch.ones(2))], base="SGD", rho=0.1, lr=0.5, momentum=0.9)
    fresh.load_state_dict(state)
    assert fresh.param_groups is fresh.base_optimizer.param_groups and fresh.param_groups[0]["lr"] == 0.25
    with pytest.raises(ValueError, match="closure"):
        optimizer.step()
    with pytest.raises(ValueError, match="base"):
        SAM(params, base=SAM)


def test_sam_is_built_from_training_params():
    from super_trainer.optimizers import build_optimizer
    from super_trainer.params import resolve_training_params

    params = resolve_training_params({"max_epochs": 1, "initial_lr": 0.2,
                                      "optimizer": {"SAM": {"base": "SGD", "rho": 0.07, "momentum": 0.5}},
                                      "optimizer_params": {"weight_decay": 1e-3}})
    optimizer = build_optimizer(make_model(), params)
    assert isinstance(optimizer, SAM) and isinstance(optimizer.base_optimizer, torch.optim.SGD)
    group = optimizer.param_groups[0]
    assert (group["lr"], group["rho"], group["momentum"], group["weight_decay"]) == (0.2, 0.07, 0.5, 1e-3)


# ---- EMA start_step / interval -------------------------------------------------------------------------

def test_ema_copies_until_start_step_then_averages_every_interval(tmp_path):
    weights = []

    class Record(Callback):  # NORMAL: after EMAUpdate (HIGH) at the same event
        def on_train_batch_gradient_step_end(self, context):
            weights.append({k: v.detach().clone() for k, v in context.net.state_dict().items()})
            context.ema_snapshots = getattr(context, "ema_snapshots", []) + [
                {k: v.clone() for k, v in context.ema_model.ema.state_dict().items()}]

    holder = {}

    class Keep(Callback):
        def on_training_end(self, context):
            holder["ema"] = context.ema_snapshots

    decay = 0.5
    Trainer("ema", tmp_path).train(model=make_model(), training_params=quiet_params(
        max_epochs=1, ema=True, ema_params={"decay": decay, "decay_type": "constant", "start_step": 2, "interval": 2},
        phase_callbacks=[Record(), Keep()]), train_loader=make_loader(48, 8), valid_loader=make_loader(8))
    ema = holder["ema"]
    assert len(ema) == len(weights) == 6
    expected = {}
    for step, w in enumerate(weights, start=1):
        if step <= 2:
            expected = {k: v.clone() for k, v in w.items()}  # copies before start_step
        elif (step - 2) % 2 == 0:  # steps 4 and 6
            expected = {k: decay * expected[k] + (1 - decay) * w[k] for k in w}
        for key in w:
            assert torch.allclose(ema[step - 1][key], expected[key], atol=1e-7), (step, key)
    assert not torch.allclose(ema[2]["0.weight"], weights[2]["0.weight"])  # step 3: kept, not copied


def test_ema_params_start_step_and_interval_are_validated(tmp_path):
    with pytest.raises(ValueError, match="ema_params.interval"):
        Trainer("bad", tmp_path).train(model=make_model(), training_params=quiet_params(
            max_epochs=1, ema=True, ema_params={"interval": 0}), train_loader=make_loader(16, 8))
