"""The shipped digits recipes: real data offline, reproducible seeded runs, and bad input that fails in one
line before anything is written (issue 8)."""
from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from conftest import only_run, python_env
from super_trainer import Trainer, cli
from super_trainer.checkpoint import read_checkpoint
from super_trainer.data import Digits
from super_trainer.models import SmallCNN, SmallResNet
from super_trainer.recipes import load_recipe

CLI = str(Path(sys.executable).parent / "super-trainer")
QUIET = ["training_hyperparams.progress_bar=false", "training_hyperparams.sg_logger=base"]
NO_HYDRA_LOGGING = ["hydra/job_logging=none", "hydra/hydra_logging=none"]  # in-process runs keep pytest's logging


def test_digits_splits_are_seeded_and_disjoint():
    train, valid, test = (Digits(split, valid_fraction=0.15, test_fraction=0.15, seed=3)
                          for split in ("train", "valid", "test"))
    assert (len(train), len(valid), len(test)) == (1257, 270, 270)
    assert train.tensors[0].shape[1:] == (1, 8, 8) and set(train.tensors[1].tolist()) == set(range(10))
    rows = {tuple(x.flatten().tolist()) for ds in (train, valid, test) for x in ds.tensors[0]}
    assert len(rows) > 1700  # the splits do not share samples (a few digits are pixel-identical)
    assert torch.equal(Digits("valid", 0.15, 0.15, seed=3).tensors[0], valid.tensors[0])
    assert not torch.equal(Digits("valid", 0.15, 0.15, seed=4).tensors[0], valid.tensors[0])
    with pytest.raises(ValueError, match="Digits: split 'test' is empty; set test_fraction > 0"):
        Digits("test")


def test_small_cnn_and_resnet_take_8_to_32_pixel_images():
    for model in (SmallCNN(in_channels=3, num_classes=7), SmallResNet(3, num_classes=7, blocks_per_stage=2)):
        for size in (8, 16, 32):
            assert model(torch.randn(2, 3, size, size)).shape == (2, 7)
    with pytest.raises(ValueError, match="widths must be a non-empty list"):
        SmallCNN(widths=[])


def test_digits_mlp_from_python_reaches_90_percent(tmp_path):
    result = Trainer.train("digits_mlp", overrides=[*QUIET, f"ckpt_root_dir={tmp_path}"])
    assert result.stop_reason == "completed" and len(result.history) == 5
    assert result.best_metric > 0.9, result.history
    assert result.test_metrics["test"]["Accuracy"] > 0.9


def _final_weights(tmp_path, name, *overrides):
    trainer = Trainer(name, tmp_path, device="cpu")  # an instance: its name and dir win over the recipe's
    result = trainer.train("digits_mlp", overrides=[*QUIET, "training_hyperparams.max_epochs=2",
                                                    "arch_params.dropout=0.3", *overrides])
    assert Path(result.ckpt_dir).parent == tmp_path / name
    return read_checkpoint(Path(result.ckpt_dir) / "ckpt_latest.pth")["net"]


def test_seeded_recipe_runs_are_bit_identical(tmp_path):
    first, second = _final_weights(tmp_path, "a"), _final_weights(tmp_path, "b")
    assert all(torch.equal(first[k], second[k]) for k in first)  # model init, data order and dropout
    other = _final_weights(tmp_path, "c", "training_hyperparams.seed=7")
    assert not torch.equal(first["layers.0.weight"], other["layers.0.weight"])


def test_digits_cnn_recipe_with_ema_early_stop_and_csv(tmp_path):
    result = Trainer.train("digits_cnn", overrides=[*QUIET, f"ckpt_root_dir={tmp_path}",
                                                    "training_hyperparams.max_epochs=2",
                                                    "training_hyperparams.max_train_batches=4"])
    exp = Path(result.ckpt_dir)
    assert exp.parent == tmp_path / "digits_cnn" and result.stop_reason == "completed"
    assert len((exp / "results.csv").read_text().strip().splitlines()) == 3  # header + 2 epochs
    assert read_checkpoint(exp / "ckpt_latest.pth")["ema_net"] is not None
    saved = OmegaConf.load(exp / "recipe.yaml")
    assert saved.architecture == "SmallCNN" and saved.training_hyperparams.ema_params.decay == 0.98


def test_changing_the_optimizer_inherits_no_sgd_argument():
    for optimizer in ("SGD", "AdamW", "Adam", "RMSprop"):
        cfg = load_recipe("digits_mlp", [f"training_hyperparams.optimizer={optimizer}"])
        assert "momentum" not in cfg.training_hyperparams.optimizer_params
    assert load_recipe("default").architecture == load_recipe("digits_mlp").architecture == "MLP"


def test_resume_past_max_epochs_warns(tmp_path):
    Trainer.train("digits_mlp", overrides=[*QUIET, f"ckpt_root_dir={tmp_path}", "training_hyperparams.max_epochs=1"])
    with pytest.warns(UserWarning, match=r"has already completed 1 epochs and max_epochs is 1; nothing left to train"):
        result = Trainer.resume_experiment("digits_mlp", ckpt_root_dir=tmp_path)
    assert result.history and [h["epoch"] for h in result.history] == [0]


# ---- the CLI: bad input fails in one line and leaves the experiment as it was ----------------------------

def run_cli(monkeypatch, capsys, *args):
    """``super-trainer ARGS`` in this process: (exit code, stdout, stderr)."""
    monkeypatch.setattr(sys, "argv", ["super-trainer", *args, *NO_HYDRA_LOGGING])
    with pytest.raises(SystemExit) as exit_info:
        cli.main()
        raise SystemExit(0)
    code = exit_info.value.code if isinstance(exit_info.value.code, int) else 1
    out, err = capsys.readouterr()
    return code, out, err


def snapshot(directory: Path):
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """An experiment trained by the CLI (in this process, one epoch)."""
    root = tmp_path_factory.mktemp("cli")
    monkeypatch = pytest.MonkeyPatch()
    monkeypatch.setattr(sys, "argv", ["super-trainer", f"ckpt_root_dir={root}", "training_hyperparams.max_epochs=1",
                                      *QUIET, *NO_HYDRA_LOGGING])
    cli.main()
    monkeypatch.undo()
    (root / "recipes").mkdir()
    (root / "recipes" / "broken.yaml").write_text("defaults:\n  - digits_mlp\n  - _self_\n"
                                                  "training_hyperparams:\n  max_epochs: [1\n  initial_lr: 0.1\n")
    return root


TOP5_OF_3_CLASSES = ["dataset_params=synthetic_classification", "arch_params.num_classes=3"] + [
    f"dataset_params.{split}.SyntheticClassification.num_classes=3"
    for split in ("train_dataset", "valid_dataset", "test_datasets.test")]

BAD_INPUT = [
    (["training_hyperparams.max_epochs=ten"], "training_params.max_epochs: must be an int >= 1, got 'ten'"),
    (["architecture=ResNet18"], "unknown model 'ResNet18'; did you mean 'SmallResNet'? (valid: MLP, "),
    (["dataset_params.train_dataloader_params.batch_size=0"],
     "dataset_params.train_dataloader_params.batch_size: must be an int >= 1, got 0"),
    (TOP5_OF_3_CLASSES, "training_params.valid_metrics_list: Top5 cannot be computed on the model's output (2, 3): "
                        "Top5: top_k=5 needs at least 5 classes, but the model outputs 3"),
    (["arch_params.in_features=32"], "the model (MLP) cannot take the data's inputs (2, 1, 8, 8)"),
    (["training_hyperparams.metric_to_watch=acc"], "metric_to_watch: 'acc' is not a metrics_dict key"),
    (["training_hyperparams.optimizer=Adamw2"], "training_params.optimizer: unknown optimizer 'Adamw2'"),
    (["training_hyperparams.resume_path=nowhere.pth"], "checkpoint not found: nowhere.pth"),
    (["--config-name=digits_mpl"], "unknown recipe 'digits_mpl'; recipes: default, digits_cnn, digits_mlp"),
    (["training_hyperparams=fast"], "Could not find 'training_hyperparams/fast'; available: base_train_params"),
    (["no_such_key=1"], "unknown recipe key 'no_such_key' (to add a new key on purpose: +no_such_key=...)"),
    (["training_hyperparams.max_epoch=3"], "unknown recipe key 'training_hyperparams.max_epoch'; did you mean "
                                           "'training_hyperparams.max_epochs'? (to add a new key on purpose: "),
    (["dataset_params.train_dataloader_params.batchsize=4"], "did you mean "
                                                             "'dataset_params.train_dataloader_params.batch_size'?"),
    (["--config-dir", "{root}/recipes", "--config-name=broken"],
     "YAML syntax error in {root}/recipes/broken.yaml, line 6"),
]


@pytest.mark.parametrize("args, message", BAD_INPUT, ids=[case[1][:40] for case in BAD_INPUT])
def test_cli_bad_input_is_one_line_and_writes_nothing(trained, monkeypatch, capsys, args, message):
    experiment = trained / "digits_mlp"
    run = only_run(experiment).relative_to(trained)
    before, runs_before = snapshot(trained), sorted(p.name for p in experiment.iterdir())
    assert {"recipe.yaml", ".hydra/config.yaml", "training_params.yaml", "ckpt_latest.pth"} <= set(
        str(Path(p).relative_to(run)) for p in before if p.startswith(str(run)))
    code, out, err = run_cli(monkeypatch, capsys, *[a.format(root=trained) for a in args], f"ckpt_root_dir={trained}")
    assert code == 1
    assert err.count("\n") == 1 and err.startswith("super-trainer: error: "), err
    assert message.format(root=trained) in err, err
    assert "Traceback" not in err + out
    assert snapshot(trained) == before  # not one byte of the existing experiment changed
    assert sorted(p.name for p in experiment.iterdir()) == runs_before  # and no new (empty) run dir


def test_cli_help_lists_recipes_nproc_and_exit_codes(monkeypatch, capsys):
    code, out, _ = run_cli(monkeypatch, capsys, "--help")
    assert code == 0
    assert "shipped recipes: default, digits_cnn, digits_mlp" in out
    assert "--nproc N" in out and "arch_params: mlp, small_cnn, small_resnet" in out
    assert all(f"\n  {c} " in out for c in ("0", "1", "130"))


def test_cli_subprocess_error_line_and_full_error(tmp_path):
    proc = subprocess.run([CLI, "architecture=ResNet18", f"ckpt_root_dir={tmp_path}"], cwd=tmp_path,
                          env=python_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1
    assert proc.stderr.splitlines() == ["super-trainer: error: recipe architecture: unknown model 'ResNet18'; did you "
                                        "mean 'SmallResNet'? (valid: MLP, SmallCNN, SmallResNet)"]
    assert not (tmp_path / "digits_mlp").exists()  # a failed new experiment leaves no dir behind
    env = dict(python_env(), HYDRA_FULL_ERROR="1")
    proc = subprocess.run([CLI, "architecture=ResNet18", f"ckpt_root_dir={tmp_path}"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1 and "Traceback" in proc.stderr and "unknown model 'ResNet18'" in proc.stderr
    # under --nproc, every rank fails alike: rank 0 reports, and torchrun's own traceback is left out
    proc = subprocess.run([CLI, "--nproc", "2", "device=cpu", "architecture=ResNet18", f"ckpt_root_dir={tmp_path}"],
                          cwd=tmp_path, env=python_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1
    assert proc.stderr.splitlines() == ["super-trainer: error: recipe architecture: unknown model 'ResNet18'; did you "
                                        "mean 'SmallResNet'? (valid: MLP, SmallCNN, SmallResNet)"]


def test_without_scikit_learn_the_error_names_the_extra(monkeypatch, capsys, tmp_path):
    from super_trainer.data import digits

    monkeypatch.setitem(sys.modules, "sklearn", None)  # import sklearn now raises ImportError
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    digits._load.cache_clear()
    try:
        with pytest.raises(ImportError, match=r"Digits data set needs scikit-learn: pip install super-trainer\[data\]"):
            Digits("train")
        code, _, err = run_cli(monkeypatch, capsys, f"ckpt_root_dir={tmp_path}")
    finally:
        digits._load.cache_clear()
    assert code == 1 and err == ("super-trainer: error: ImportError: the Digits data set needs scikit-learn: "
                                 "pip install super-trainer[data]\n")
    assert not (tmp_path / "digits_mlp").exists()
