"""CLI sweeps (SPEC §8 "Checkpoint management"): runs named after their overrides, every job run, one summary."""
from __future__ import annotations

import csv
import re
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from conftest import python_env
from super_trainer.checkpoint import read_checkpoint
from super_trainer.sweep import MAX_NAME_CHARS, run_name, swept_keys

CLI = str(Path(sys.executable).parent / "super-trainer")
TINY = ["training_hyperparams.max_epochs=1", "training_hyperparams.progress_bar=false",
        "training_hyperparams.max_train_batches=2"]


def sweep(args, cwd):
    return subprocess.run([CLI, "-m", *args], cwd=cwd, env=python_env(), capture_output=True, text=True, timeout=300)


def test_run_names_are_readable_safe_and_unique():
    assert run_name(["training_hyperparams.initial_lr=0.1", "training_hyperparams.max_epochs=3"], 0) == \
        "0_initial_lr=0.1,max_epochs=3"
    # only the swept keys when known; where runs go and resume never name a run
    overrides = ["training_hyperparams.initial_lr=0.1", "training_hyperparams.max_epochs=3", "experiment_name=x",
                 "ckpt_root_dir=/tmp/ck", "training_hyperparams.resume=true", "hydra.verbose=true"]
    assert run_name(overrides, 4, swept=["training_hyperparams.initial_lr"]) == "4_initial_lr=0.1"
    assert run_name(overrides, 4) == "4_initial_lr=0.1,max_epochs=3"
    assert run_name([], 2) == "2_defaults"
    # keys that would clash keep more of their path; unsafe characters become "_"
    assert run_name(["arch_params.dropout=0.1", "training_hyperparams.dropout=0.2"], 1) == \
        "1_arch_params.dropout=0.1,training_hyperparams.dropout=0.2"
    name = run_name(["checkpoint_params.checkpoint_path=/data/my run/x.pth", "+a.betas=[0.9,0.99]"], 3)
    assert name == "3_checkpoint_path=data_my_run_x.pth,betas=0.9_0.99"
    assert re.fullmatch(r"[A-Za-z0-9._+=,-]+", name)
    # long lists: whole overrides while they fit, then how many were left out and a hash of them all
    many = [f"training_hyperparams.key_{i}=value_{i}" for i in range(20)]
    long_name = run_name(many, 7)
    assert len(long_name) <= MAX_NAME_CHARS + 3 and long_name.startswith("7_key_0=value_0,key_1=value_1")
    assert re.search(r",\+\d+_[0-9a-f]{8}$", long_name)
    assert run_name(many[:-1] + ["training_hyperparams.key_19=other"], 7) != long_name  # the hash sees every value
    assert run_name(many, 8) != long_name


def test_swept_keys_come_from_the_command_line():
    assert swept_keys(["-m", "--config-name=x", "a.b=1,2", "c=3", "+d=range(1,3)", "e=[1,2]"]) == ["a.b", "d"]
    assert swept_keys(["c=3"]) is None  # no sweep override: runs are named after all their overrides


def test_a_sweep_with_a_bad_job_runs_the_others_and_ends_with_a_summary(tmp_path):
    runs = tmp_path / "ck" / "digits_mlp"
    args = [*TINY, "training_hyperparams.initial_lr=-1,0.01", f"ckpt_root_dir={tmp_path / 'ck'}"]
    proc = sweep(args, cwd=tmp_path)
    assert proc.returncode == 1, proc.stderr[-3000:]
    error = "training_params.initial_lr: must be a number >= 0"
    assert "super-trainer: error: job 0 (" in proc.stderr and error in proc.stderr

    good = runs / "1_initial_lr=0.01"  # the job after the bad one ran
    assert read_checkpoint(good / "ckpt_latest.pth")["epoch"] == 1
    assert OmegaConf.load(good / "recipe.yaml").training_hyperparams.initial_lr == 0.01
    assert (good / ".hydra" / "overrides.yaml").is_file()
    assert not (runs / "0_initial_lr=-1").exists()  # the bad job wrote nothing

    csv_files = list(runs.glob("sweep_*.csv"))
    assert len(csv_files) == 1
    rows = list(csv.DictReader(csv_files[0].open()))
    assert [(r["job"], r["stop_reason"]) for r in rows] == [("0", "error"), ("1", "completed")]
    assert rows[0]["error"].startswith(error) and rows[0]["error"].endswith("got -1")
    assert f"): {rows[0]['error']}\n" in proc.stderr  # the same one line
    assert "training_hyperparams.initial_lr=-1" in rows[0]["overrides"].split(" ")
    assert rows[1]["run_dir"] == str(good) and rows[1]["error"] == "" and rows[1]["metric_to_watch"] == "Accuracy"
    assert float(rows[1]["best_metric"]) == pytest.approx(read_checkpoint(good / "ckpt_best.pth")["best_metric"])

    # the table: one line per job, the shared overrides once above it, and where the CSV is
    table = proc.stdout[proc.stdout.index("sweep: 2 job(s), 1 failed"):]
    assert "every job: training_hyperparams.max_epochs=1" in table
    lines = table.splitlines()
    assert re.match(r"0\s+training_hyperparams.initial_lr=-1\s+-\s+error\s+training_params.initial_lr: must",
                    lines[2])
    assert re.match(r"1\s+training_hyperparams.initial_lr=0.01\s+Accuracy=0\.\d{4}\s+completed$", lines[3])
    assert lines[4] == f"summary: {csv_files[0]}"

    # Hydra's multirun.yaml is kept under the sweep's stamp, so the next sweep cannot overwrite it
    first_config = csv_files[0].with_suffix(".yaml")
    assert OmegaConf.load(first_config).hydra.overrides.task[-2] == "training_hyperparams.initial_lr=-1,0.01"
    assert not (runs / "multirun.yaml").exists()
    first_checkpoint = (good / "ckpt_latest.pth").read_bytes()

    # the same sweep again, with MLflow: the good job gets a new run dir and the first sweep's files stay as they
    # were; MLflow gets one experiment for the sweep, each job a run named after its run dir
    pytest.importorskip("mlflow", reason="the [mlflow] extra is not installed")
    proc = sweep([*args, "training_hyperparams.sg_logger=mlflow"], cwd=tmp_path)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert (good / "ckpt_latest.pth").read_bytes() == first_checkpoint
    assert OmegaConf.load(first_config).hydra.overrides.task[-2] == "training_hyperparams.initial_lr=-1,0.01"
    second_csv = next(p for p in runs.glob("sweep_*.csv") if p != csv_files[0])
    assert second_csv.with_suffix(".yaml").is_file()
    rows = list(csv.DictReader(second_csv.open()))
    stamp = second_csv.stem[len("sweep_"):]
    assert Path(rows[1]["run_dir"]).name == f"1_initial_lr=0.01_{stamp}"

    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'ck' / 'mlruns' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("digits_mlp")
    logged = {r.info.run_name: r.data.metrics["valid/Accuracy"] for r in client.search_runs([experiment.experiment_id])}
    assert logged == {f"1_initial_lr=0.01_{stamp}": pytest.approx(float(rows[1]["best_metric"]))}
