"""SuperGradients 3.7.1's own recipes, byte for byte out of its wheel, train here unchanged (SPEC §8 "SuperGradients
recipes verbatim"): every ``recipes/training_hyperparams/*.yaml`` through ``Trainer.train(recipe, overrides=...)``, a
representative few through the ``super-trainer`` CLI, and SG's top-level ``cifar10_resnet.yaml`` with its
``variable_setup`` scaffolding both ways.

Only the model and the data are swapped (a small recipe of ours beside SG's files picks SG's training file, a tiny MLP
and a synthetic data set) and the run is shrunk (2 epochs of 2 batches; ``log_interval=1`` so every step's lr reaches
TensorBoard). SG-only losses, metrics and callbacks are stand-ins registered with SG's decorators
(tests/_sg_standins.py). Each run is then checked against SG's own values, read from the same files: the optimizer
class and its parameters (with SG's per-optimizer defaults), EMA, and the lr after every step, computed from SG's
warmup and schedule values with SPEC §4's formulas.

`make dev` downloads the wheel into .cache/ (never installed: SG's dependencies would break the environment).
"""
from __future__ import annotations

import csv
import math
import subprocess
import warnings
import zipfile
from pathlib import Path
from typing import Any, Dict, List

import numpy as np
import pytest
from omegaconf import OmegaConf
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import _sg_standins  # noqa: F401  (registers the stand-ins in this process)
from conftest import PYTHON, ROOT, only_run, python_env
from super_trainer import Trainer
from super_trainer.lr_modes import normalize_lr_mode, normalize_warmup_mode
from super_trainer.checkpoint import read_checkpoint

WHEEL = ROOT / ".cache" / "super_gradients-3.7.1-py3-none-any.whl"
RECIPES = "super_gradients/recipes/"

SG_TRAINING_FILES = [
    "cifar10_resnet_train_params", "cityscapes_default_train_params", "coco2017_dekr_pose_train_params",
    "coco2017_ppyoloe_train_params", "coco2017_rescoring_train_params", "coco2017_ssd_lite_mobilenet_v2_train_params",
    "coco2017_yolo_nas_pose_train_params", "coco2017_yolo_nas_train_params", "coco2017_yolox_train_params",
    "coco_segmentation_shelfnet_lw_train_params", "default_train_params", "imagenet_efficientnet_train_params",
    "imagenet_mobilenetv2_train_params", "imagenet_mobilenetv3_train_params", "imagenet_regnetY_train_params",
    "imagenet_repvgg_train_params", "imagenet_resnet50_kd_train_params", "imagenet_resnet50_train_params",
    "imagenet_vit_train_params", "supervisely_default_train_params",
]

# The model/data swap: files of ours beside SG's (SG's files are not touched). num_joints / oks_sigmas /
# num_classes are what SG's pose and detection files interpolate from dataset_params and arch_params.
TINY_DATA = """\
train_dataset:
  SyntheticClassification: {num_samples: 32, num_features: 8, num_classes: 6, split: train, seed: 0}
valid_dataset:
  SyntheticClassification: {num_samples: 16, num_features: 8, num_classes: 6, split: valid, seed: 0}
train_dataloader_params: {batch_size: 8, shuffle: true, num_workers: 0}
val_dataloader_params: {batch_size: 16, num_workers: 0}
num_joints: 2
oks_sigmas: [0.1, 0.1]
"""
TINY_ARCH = "in_features: 8\nnum_classes: 6\nhidden: [16]\n"
SMOKE_RECIPE = """\
defaults:
  - training_hyperparams: default_train_params
  - dataset_params: st_tiny_data
  - arch_params: st_tiny_arch
  - checkpoint_params: default_checkpoint_params
  - _self_
  - variable_setup

architecture: MLP
experiment_name: sg_smoke
custom_imports: [_sg_standins]
device: cpu
"""
EPOCHS, BATCHES = 2, 2
SIZE = [f"++training_hyperparams.max_epochs={EPOCHS}", f"training_hyperparams.max_train_batches={BATCHES}",
        "training_hyperparams.max_valid_batches=1", "++training_hyperparams.log_interval=1"]
# What SG's own top-level recipes add to these files: the default file lacks what SG requires of a recipe (max_epochs,
# initial_lr, loss) and watches Accuracy without measuring it; the two segmentation files leave the loss to the
# top-level recipe (SG's cityscapes_*.yaml / supervisely_unet.yaml set one there).
COMPLETES = {"default_train_params": ["++training_hyperparams.initial_lr=0.1", "training_hyperparams.loss=CrossEntropyLoss",
                                      "training_hyperparams.valid_metrics_list=[Accuracy]"],
             "cityscapes_default_train_params": ["training_hyperparams.loss=CrossEntropyLoss"],
             "supervisely_default_train_params": ["training_hyperparams.loss=CrossEntropyLoss"]}
# SG 3.7's optimizer_params defaults (training/params.py there), by optimizer name.
SG_OPTIMIZER_DEFAULTS = {"SGD": {"weight_decay": 1e-4, "momentum": 0.9}, "Adam": {"weight_decay": 1e-4},
                         "RMSprop": {"weight_decay": 1e-4, "momentum": 0.9},
                         "RMSpropTF": {"weight_decay": 1e-4, "momentum": 0.9}}


@pytest.fixture(scope="session")
def sg_recipes(tmp_path_factory) -> Path:
    """SG's recipes/ tree extracted from the wheel (zipfile checks every file's CRC), plus our three small files."""
    if not WHEEL.is_file():
        pytest.fail(f"{WHEEL.relative_to(ROOT)} is missing: run `make dev` (it downloads SuperGradients' wheel)")
    root = tmp_path_factory.mktemp("sg") / "recipes"
    with zipfile.ZipFile(WHEEL) as wheel:
        for name in wheel.namelist():
            if name.startswith(RECIPES) and name.endswith(".yaml"):
                target = root / name[len(RECIPES):]
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(wheel.read(name))
    (root / "dataset_params" / "st_tiny_data.yaml").write_text(TINY_DATA)
    (root / "arch_params" / "st_tiny_arch.yaml").write_text(TINY_ARCH)
    (root / "st_sg_smoke.yaml").write_text(SMOKE_RECIPE)
    return root


def test_every_training_hyperparams_file_is_covered(sg_recipes):
    assert sorted(p.stem for p in (sg_recipes / "training_hyperparams").glob("*.yaml")) == SG_TRAINING_FILES


# ---- what SG's files say -------------------------------------------------------------------------------------

def sg_values(sg_recipes: Path, name: str, overrides: List[str]) -> Any:
    """SG's training params for ``name``, read with OmegaConf alone (its default file under the named one) plus the
    test's own dotted overrides: what SG would train with."""
    folder = sg_recipes / "training_hyperparams"
    own = OmegaConf.load(folder / f"{name}.yaml")
    own.pop("defaults", None)
    merged = OmegaConf.merge(OmegaConf.load(folder / "default_train_params.yaml"), own)
    for override in overrides:
        key, value = override.lstrip("+").split("=", 1)
        if key.startswith("training_hyperparams."):
            OmegaConf.update(merged, key.split(".", 1)[1], OmegaConf.create(f"v: {value}").v, force_add=True)
    return merged


def sg_lr_updates(sg: Any) -> List[float]:
    node = sg.lr_updates
    if sg.get("step_lr_update_freq"):  # SG: ceil(freq·x) within [W, M − C)
        freq, end = float(sg.step_lr_update_freq), sg.max_epochs - sg.lr_cooldown_epochs
        return [e for e in (math.ceil(freq * x) for x in range(1, end)) if sg.lr_warmup_epochs <= e < end]
    if node._target_ == "numpy.arange":
        return np.arange(node.start, node.stop, node.step).tolist()
    assert node._target_ == "super_gradients.training.utils.utils.empty_list"
    return []


def sg_step_lrs(sg: Any, steps: int, epochs: int) -> List[float]:
    """The lr after every optimizer step (as logged at Step/LR): SG's warmup and schedule values through SPEC §4."""
    lr0, W, S, C = float(sg.initial_lr), sg.lr_warmup_epochs, sg.lr_warmup_steps, sg.lr_cooldown_epochs
    L, M, w0 = steps, epochs, sg.warmup_initial_lr
    mode, warmup = normalize_lr_mode(sg.lr_mode), normalize_warmup_mode(sg.warmup_mode)
    r, f = float(sg.cosine_final_lr_ratio), float(sg.get("lr_decay_factor", 0.1))
    lr, logged = lr0, []
    for E in range(M):
        if warmup == "linear_epoch_step" and 0 < W and E <= W:
            start = lr0 / (W + 1) if w0 is None else float(w0)
            lr = start + E * (lr0 - start) / W
        for b in range(L):
            g = E * L + b
            if warmup == "linear_batch_step" and g < (S or W * L):
                span = S or W * L
                start = lr0 / (span + 1) if w0 is None else float(w0)
                lr = start if span == 1 else start + g * (lr0 - start) / (span - 1)
            if W <= E < M - C and g + 1 >= S:
                if mode == "cosine":
                    it, total = max(0, L * (E - W) + b - S), L * (M - W - C) - S
                    lr = lr0 * (0.5 * (1 + math.cos(math.pi * it / (total + 1))) * (1 - r) + r)
                elif mode == "poly":
                    lr = lr0 * max(0.0, 1 - (L * (E - W) + b) / (L * (M - W - C))) ** 0.9
            logged.append(lr)
        if mode == "step" and E >= W:
            lr = lr0 * f ** sum(1 for u in sg_lr_updates(sg) if u <= E)
    return logged


def check_sg_values_used(sg: Any, exp_dir: Path, metrics: Dict[str, Any]) -> None:
    """The run in ``exp_dir`` used SG's values ``sg``: hyperparameters, optimizer, EMA, lr per step, watched metric."""
    used = OmegaConf.load(exp_dir / "training_params.yaml")
    assert used.lr_mode == normalize_lr_mode(sg.lr_mode) and used.warmup_mode == normalize_warmup_mode(sg.warmup_mode)
    for key in ("max_epochs", "lr_warmup_epochs", "lr_warmup_steps", "lr_cooldown_epochs", "warmup_initial_lr",
                "cosine_final_lr_ratio", "ema", "zero_weight_decay_on_bias_and_bn", "mixed_precision",
                "average_best_models", "metric_to_watch", "greater_metric_to_watch_is_better", "batch_accumulate",
                "clip_grad_norm", "sync_bn", "save_ckpt_epoch_list", "optimizer", "run_test_freq", "seed"):
        assert used[key] == sg[key], key
    assert float(used.initial_lr) == float(sg.initial_lr)
    for key in ("lr_decay_factor", "multiply_head_lr", "static_assigner_end_epoch", "warmup_momentum", "warmup_bias_lr"):
        if key in sg:
            assert used[key] == sg[key], key
    assert used.lr_updates == pytest.approx(sg_lr_updates(sg))
    assert {k: used.ema_params[k] for k in sg.ema_params} == dict(sg.ema_params)

    state = read_checkpoint(exp_dir / "ckpt_latest.pth")
    assert state["optimizer_type"] == sg.optimizer
    groups = {g.get("name"): g for g in state["optimizer_state_dict"]["param_groups"]}
    expected = {**SG_OPTIMIZER_DEFAULTS.get(sg.optimizer, {}), **OmegaConf.to_container(sg.optimizer_params)}
    assert expected, "every SG recipe's optimizer gets parameters"
    for key, value in expected.items():
        assert groups["default"][key] == pytest.approx(value), key
    if sg.zero_weight_decay_on_bias_and_bn:
        assert groups["default_no_decay"]["weight_decay"] == 0.0
    assert (state["ema_net"] is not None) == sg.ema

    events = EventAccumulator(str(exp_dir), size_guidance={"scalars": 0})
    events.Reload()
    logged = [e.value for e in sorted(events.Scalars("Step/LR/default"), key=lambda e: e.step)]
    steps = math.ceil(BATCHES / sg.batch_accumulate)
    assert logged == pytest.approx(sg_step_lrs(sg, steps, EPOCHS), rel=1e-6, abs=1e-12)
    assert sg.metric_to_watch in metrics  # a compound metric's component (mAP@0.50:0.95, AP, target_IOU) included


def overrides_for(name: str, root: Path) -> List[str]:
    return [f"training_hyperparams={name}", f"ckpt_root_dir={root}", f"experiment_name={name}", *SIZE,
            *COMPLETES.get(name, [])]


# ---- through the Python API: every file --------------------------------------------------------------------

@pytest.mark.parametrize("name", SG_TRAINING_FILES)
def test_sg_training_file_trains_unchanged_through_the_python_api(sg_recipes, name, tmp_path):
    overrides = overrides_for(name, tmp_path)
    sg = sg_values(sg_recipes, name, overrides)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = Trainer.train(str(sg_recipes / "st_sg_smoke.yaml"), overrides=overrides)
    assert result.stop_reason == "completed" and len(result.history) == EPOCHS
    check_sg_values_used(sg, Path(result.ckpt_dir), result.metrics)
    messages = [str(w.message) for w in caught]
    if sg.lr_warmup_epochs + sg.lr_cooldown_epochs > EPOCHS:  # SG's long warmups: a warning, not an error
        assert any("exceed max_epochs" in m for m in messages), messages


# ---- through the CLI: a representative few -------------------------------------------------------------------

CLI_FILES = [
    "imagenet_repvgg_train_params",  # SG's default_train_params.yaml, not ours: SGD and no warmup
    "coco2017_yolox_train_params",  # a compound metric watched by component, warmup and cooldown past the run
]


def test_sg_training_files_train_unchanged_through_the_cli(sg_recipes, tmp_path):
    """One sweep over the files (one process start instead of one per file); job i trains in
    ``sg_cli/<i>_training_hyperparams=<file>``, as the sweep's summary CSV lists."""
    sweep = [f"training_hyperparams={','.join(CLI_FILES)}", f"ckpt_root_dir={tmp_path}", "experiment_name=sg_cli", *SIZE]
    proc = subprocess.run([PYTHON, "-m", "super_trainer.train_from_recipe", "--config-dir", str(sg_recipes),
                           "--config-name", "st_sg_smoke", "-m", *sweep], cwd=tmp_path, env=python_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = next((tmp_path / "sg_cli").glob("sweep_*.csv"))
    run_dirs = [Path(row["run_dir"]) for row in csv.DictReader(summary.open())]
    assert [p.name for p in run_dirs] == [f"{job}_training_hyperparams={name}" for job, name in enumerate(CLI_FILES)]
    for exp, name in zip(run_dirs, CLI_FILES):
        assert OmegaConf.load(exp / "recipe.yaml").experiment_name == "sg_cli"
        state = read_checkpoint(exp / "ckpt_latest.pth")
        check_sg_values_used(sg_values(sg_recipes, name, overrides_for(name, tmp_path)), exp, state["metrics"])


# ---- SG's top-level recipe and its scaffolding --------------------------------------------------------------

# SG's cifar10_resnet.yaml as is; its model and data swapped; SG's variable_setup shortcuts set the lr, the epochs
# and the batch size; ckpt_root_dir stays null (variable_setup's), so the default root is used.
CIFAR_SWAP = ["architecture=MLP", "arch_params=st_tiny_arch", "dataset_params=st_tiny_data", "+device=cpu",
              "lr=0.05", f"epochs={EPOCHS}", "batch_size=4", f"training_hyperparams.max_train_batches={BATCHES}",
              "training_hyperparams.max_valid_batches=1", "++training_hyperparams.log_interval=1"]


def check_cifar10_run(sg_recipes: Path, cwd: Path) -> Path:
    exp = only_run(cwd / "checkpoints" / "resnet18_cifar_interpolation_check")  # SG's experiment_name, default root
    used = OmegaConf.load(exp / "training_params.yaml")
    assert (used.initial_lr, used.max_epochs) == (0.05, EPOCHS)  # the lr / epochs shortcuts reached the params
    assert OmegaConf.load(exp / "recipe.yaml").dataset_params.train_dataloader_params.batch_size == 4
    sg = sg_values(sg_recipes, "cifar10_resnet_train_params",
                   ["training_hyperparams.initial_lr=0.05", f"training_hyperparams.max_epochs={EPOCHS}"])
    check_sg_values_used(sg, exp, read_checkpoint(exp / "ckpt_latest.pth")["metrics"])
    assert not (cwd / "None").exists() and not (cwd / "checkpoints" / "None").exists()
    return exp


def test_sg_top_level_recipe_with_variable_setup_through_the_cli(sg_recipes, tmp_path):
    proc = subprocess.run([PYTHON, "-m", "super_trainer.train_from_recipe", "--config-dir", str(sg_recipes),
                           "--config-name", "cifar10_resnet", *CIFAR_SWAP], cwd=tmp_path, env=python_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    exp = check_cifar10_run(sg_recipes, tmp_path)
    # SG's recipe keeps Hydra's output_subdir: Hydra wrote .hydra/ into hydra_output_dir's dir (the experiment dir)
    hydra = OmegaConf.load(exp.parent / ".hydra" / "hydra.yaml").hydra
    assert hydra.callbacks.shortcuts_cb._target_ == "super_trainer.sg_compat.RecipeShortcutsCallback"


def test_sg_top_level_recipe_with_variable_setup_through_the_python_api(sg_recipes, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = Trainer.train(str(sg_recipes / "cifar10_resnet.yaml"), overrides=CIFAR_SWAP)
    assert result.stop_reason == "completed"
    check_cifar10_run(sg_recipes, tmp_path)
