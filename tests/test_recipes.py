"""Recipes and the CLI (SPEC §5): composition, registries, the run dir, sweeps, exit codes."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from conftest import PYTHON, only_run, python_env
from super_trainer import Callback, Trainer
from super_trainer.checkpoint import read_checkpoint
from super_trainer.recipes import load_recipe, recipes_dir
from super_trainer.registry import CALLBACKS

CLI = str(Path(sys.executable).parent / "super-trainer")
QUICK = ["training_hyperparams.max_epochs=1", "training_hyperparams.progress_bar=false"]


def cli(args, cwd, env=None, timeout=300):
    return subprocess.run([CLI, *args], cwd=cwd, env=env or python_env(), capture_output=True, text=True,
                          timeout=timeout)


def test_recipe_by_name_on_the_class(tmp_path):
    cfg = load_recipe("digits_mlp", [*QUICK, f"ckpt_root_dir={tmp_path}", "experiment_name=by_name"])
    result = Trainer.train(cfg)
    exp = Path(result.ckpt_dir)
    assert exp.parent == tmp_path / "by_name" and result.stop_reason == "completed"
    saved = OmegaConf.load(exp / "recipe.yaml")
    assert saved.architecture == "MLP" and saved.training_hyperparams.max_epochs == 1
    assert read_checkpoint(exp / "ckpt_latest.pth")["epoch"] == 1
    assert set(result.test_metrics) == {"test"}


SEEN = {}


@CALLBACKS.register("RecipeContextSpy")
class RecipeContextSpy(Callback):
    def on_training_start(self, context):
        SEEN.update(architecture=context.architecture, arch_params=context.arch_params,
                    checkpoint_params=context.checkpoint_params)


def test_recipe_by_path_on_an_instance_uses_the_instance_dir(tmp_path):
    recipe = tmp_path / "mine.yaml"
    recipe.write_text("defaults:\n  - base\n  - training_hyperparams: default_train_params\n"
                      "  - dataset_params: digits\n  - arch_params: mlp\n"
                      "  - checkpoint_params: default\n  - _self_\nexperiment_name: mine\narchitecture: MLP\n"
                      "arch_params:\n  hidden: [16]\n"
                      "training_hyperparams:\n  max_epochs: 1\n  progress_bar: false\n  phase_callbacks: [RecipeContextSpy]\n")
    result = Trainer("chosen", tmp_path / "root").train(recipe)
    exp = Path(result.ckpt_dir)
    assert exp.parent == tmp_path / "root" / "chosen"  # the instance's names win over the recipe's
    assert (exp / "recipe.yaml").is_file()
    assert read_checkpoint(exp / "ckpt_latest.pth")["net"]["layers.0.weight"].shape == (16, 64)
    assert SEEN["architecture"] == "MLP" and SEEN["arch_params"]["hidden"] == [16]
    assert SEEN["checkpoint_params"]["strict_load"] is True


def test_unknown_names_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown recipe 'digits_mpl'; did you mean 'digits_mlp'"):
        load_recipe("digits_mpl")
    cfg = load_recipe("digits_mlp", [*QUICK, f"ckpt_root_dir={tmp_path}", "architecture=MLPP"])
    with pytest.raises(ValueError, match="recipe architecture: unknown model 'MLPP'; did you mean 'MLP'"):
        Trainer.train(cfg)
    cfg = load_recipe("digits_mlp", [*QUICK, f"ckpt_root_dir={tmp_path}", "custom_imports=[no_such_module_x]"])
    with pytest.raises(ValueError, match="custom_imports: cannot import 'no_such_module_x'"):
        Trainer.train(cfg)


def test_cli_default_recipe_from_any_directory(tmp_path):
    proc = cli([*QUICK, f"ckpt_root_dir={tmp_path / 'ck'}"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    exp = only_run(tmp_path / "ck" / "digits_mlp")
    assert f"run dir: {exp}" in proc.stdout
    assert {p.name for p in exp.parent.iterdir()} == {exp.name}  # Hydra's files, the job log: all in the run dir
    names = {p.name for p in exp.iterdir()}
    assert {".hydra", "recipe.yaml", "ckpt_latest.pth", "ckpt_best.pth", "experiment.log"} <= names
    assert {p.name for p in (exp / ".hydra").iterdir()} == {"config.yaml", "hydra.yaml", "overrides.yaml"}
    assert OmegaConf.load(exp / ".hydra" / "config.yaml").architecture == "MLP"
    assert OmegaConf.load(exp / ".hydra" / "overrides.yaml") == [*QUICK, f"ckpt_root_dir={tmp_path / 'ck'}"]


def test_python_module_entry_and_cfg_job(tmp_path):
    proc = subprocess.run([PYTHON, "-m", "super_trainer.train_from_recipe", "--cfg", "job", "experiment_name=shown"],
                          cwd=tmp_path, env=python_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    shown = OmegaConf.create(proc.stdout)
    assert shown.experiment_name == "shown" and shown.architecture == "MLP"
    assert not (tmp_path / "checkpoints").exists()  # --cfg job trains nothing


def test_cli_sweep_gives_each_job_its_dir(tmp_path):
    proc = cli(["-m", *QUICK, "training_hyperparams.initial_lr=0.1,0.01", f"ckpt_root_dir={tmp_path}"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    for job, lr in ((0, 0.1), (1, 0.01)):  # <ckpt_root_dir>/<experiment_name>/<job>_<swept overrides>
        run = tmp_path / "digits_mlp" / f"{job}_initial_lr={lr}"
        saved = OmegaConf.load(run / "recipe.yaml")
        assert saved.training_hyperparams.initial_lr == lr and saved.training_hyperparams.run_id == run.name
        assert (run / ".hydra" / "overrides.yaml").is_file() and f"run dir: {run}" in proc.stdout


def test_cli_user_recipe_dir_custom_imports_and_ctrl_c_exit_code(tmp_path):
    (tmp_path / "my_callbacks.py").write_text(
        "from super_trainer import Callback\nfrom super_trainer.registry import CALLBACKS\n\n"
        "@CALLBACKS.register\nclass CtrlCAt(Callback):\n    def __init__(self, epoch, batch):\n"
        "        self.epoch, self.batch = epoch, batch\n\n    def on_train_batch_start(self, context):\n"
        "        if (context.epoch, context.batch_idx) == (self.epoch, self.batch):\n"
        "            raise KeyboardInterrupt\n")
    (tmp_path / "recipes").mkdir()
    (tmp_path / "recipes" / "interrupted.yaml").write_text(
        "defaults:\n  - default\n  - _self_\nexperiment_name: interrupted\ncustom_imports: [my_callbacks]\n"
        "training_hyperparams:\n  max_epochs: 3\n  phase_callbacks:\n    - CtrlCAt: {epoch: 1, batch: 2}\n")
    # my_callbacks.py is found because it is in the working directory, as for `python script.py`
    proc = cli(["--config-dir", str(tmp_path / "recipes"), "--config-name=interrupted", f"ckpt_root_dir={tmp_path}"],
               cwd=tmp_path)
    assert proc.returncode == 130, proc.stderr[-2000:]
    exp = only_run(tmp_path / "interrupted")
    assert read_checkpoint(exp / "ckpt_latest.pth")["epoch"] == 1
    assert (exp / "experiment.log").read_text().strip().endswith("training ended: interrupted")


def test_resume_experiment_rereads_the_saved_recipe(tmp_path):
    cfg = load_recipe("digits_mlp", [*QUICK, f"ckpt_root_dir={tmp_path}", "experiment_name=again"])
    first = Path(Trainer.train(cfg).ckpt_dir)
    latest = Path(Trainer.train(cfg).ckpt_dir)  # a second run: resume_experiment continues this one
    before = sorted((p.name, p.stat().st_mtime_ns) for p in first.iterdir())
    saved = OmegaConf.load(latest / "recipe.yaml")
    saved.training_hyperparams.max_epochs = 2  # raise max_epochs, as one may on resume
    OmegaConf.save(saved, latest / "recipe.yaml")
    result = Trainer.resume_experiment("again", ckpt_root_dir=tmp_path)
    assert Path(result.ckpt_dir) == latest and [h["epoch"] for h in result.history] == [0, 1]
    assert read_checkpoint(latest / "ckpt_latest.pth")["epoch"] == 2
    assert sorted((p.name, p.stat().st_mtime_ns) for p in first.iterdir()) == before
    with pytest.warns(UserWarning, match="nothing left to train"):  # the first run already ended
        again = Trainer.resume_experiment("again", ckpt_root_dir=tmp_path, run_id=first.name)  # a given run
    assert Path(again.ckpt_dir) == first and [h["epoch"] for h in again.history] == [0]


def test_cli_nproc_launches_torchrun(tmp_path):
    proc = cli(["--nproc", "2", *QUICK, f"ckpt_root_dir={tmp_path}", "experiment_name=ddp", "device=cpu"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("run dir:") == 1  # only rank 0 reports
    assert read_checkpoint(only_run(tmp_path / "ddp") / "ckpt_latest.pth")["epoch"] == 1  # one run dir for all ranks


def test_shipped_recipes_are_complete():
    directory = recipes_dir()
    for group in ("training_hyperparams", "dataset_params", "arch_params", "checkpoint_params"):
        assert list((directory / group).glob("*.yaml")), group
    assert shutil.which("super-trainer", path=str(Path(sys.executable).parent))


def test_base_train_params_lists_every_default():
    from super_trainer.params import DEFAULT_TRAINING_PARAMS, REQUIRED

    base = OmegaConf.load(recipes_dir() / "training_hyperparams" / "base_train_params.yaml")
    assert list(base) == list(DEFAULT_TRAINING_PARAMS)
    for key, default in DEFAULT_TRAINING_PARAMS.items():
        if default is REQUIRED:
            assert OmegaConf.is_missing(base, key), key
        else:
            assert OmegaConf.to_container(base)[key] == default, key


def test_any_training_param_can_be_overridden_without_plus(tmp_path):
    cfg = load_recipe("digits_mlp", ["training_hyperparams.progress_bar=false", "training_hyperparams.clip_grad_norm=1.0"])
    assert cfg.training_hyperparams.progress_bar is False and cfg.training_hyperparams.clip_grad_norm == 1.0
    assert cfg.training_hyperparams.lr_mode == "cosine"  # the default recipe's own choice still applies
