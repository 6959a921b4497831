"""Run dirs (SPEC §8 "Checkpoint management"): one run dir per train() call, SG 3.7's names, run_id, resume picking
the latest run, the 0.2 flat layout still resuming, and the lock that refuses a second live writer."""
from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import torch

from conftest import PYTHON, ROOT, make_loader, make_model, python_env, quiet_params
from super_trainer import Callback, Trainer
from super_trainer.checkpoint import read_checkpoint
from super_trainer.runs import LOCK_FILE, RunLock, RunLockedError, latest_run_dir

RUN_NAME = re.compile(r"RUN_\d{8}_\d{6}_\d{6}")
WORKER = str(ROOT / "tests" / "_run_worker.py")


def _train(root, epochs=1, name="exp", **params):
    return Trainer(name, root, device="cpu").train(
        model=make_model(), training_params=quiet_params(max_epochs=epochs, **params), train_loader=make_loader(),
        valid_loader=make_loader(16, seed=1))


def _snapshot(directory: Path):
    return {p.relative_to(directory): (p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
            for p in sorted(directory.rglob("*")) if p.is_file()}


def test_two_runs_of_one_experiment_train_in_two_run_dirs_and_the_first_is_untouched(tmp_path):
    first = Path(_train(tmp_path).ckpt_dir)
    before = _snapshot(first)
    second = Path(_train(tmp_path).ckpt_dir)
    assert first != second and first.parent == second.parent == tmp_path / "exp"
    assert RUN_NAME.fullmatch(first.name) and RUN_NAME.fullmatch(second.name) and first.name < second.name
    assert {"ckpt_latest.pth", "ckpt_best.pth", "training_params.yaml", "experiment.log"} <= set(os.listdir(second))
    assert _snapshot(first) == before  # not one byte or timestamp changed
    assert LOCK_FILE not in os.listdir(first)  # released when training ended


class SeeDir(Callback):
    def on_training_start(self, context):
        self.ckpt_dir = context.ckpt_dir


def test_context_and_result_name_the_run_dir_and_the_trainer_the_experiment_dir(tmp_path):
    seen = SeeDir()
    trainer = Trainer("exp", tmp_path, device="cpu")
    result = trainer.train(model=make_model(), training_params=quiet_params(max_epochs=1, phase_callbacks=[seen]),
                           train_loader=make_loader(), valid_loader=make_loader(16))
    assert Path(seen.ckpt_dir) == Path(result.ckpt_dir) and Path(result.ckpt_dir).parent == trainer.ckpt_dir
    assert Path(result.latest_ckpt_path).parent == Path(result.ckpt_dir)


def test_resume_continues_the_latest_run_by_name_skipping_one_without_a_checkpoint(tmp_path):
    first = Path(_train(tmp_path).ckpt_dir)
    second = Path(_train(tmp_path).ckpt_dir)
    before = _snapshot(first)
    (tmp_path / "exp" / "RUN_29991231_235959_999999").mkdir()  # a newer run that failed before its first checkpoint
    with pytest.warns(UserWarning, match="holds no ckpt_latest.pth"):
        resumed = _train(tmp_path, epochs=2, resume=True)
    assert Path(resumed.ckpt_dir) == second
    assert [h["epoch"] for h in resumed.history] == [0, 1]
    assert read_checkpoint(second / "ckpt_latest.pth")["epoch"] == 2
    assert _snapshot(first) == before


def test_run_id_names_the_run_a_second_fresh_run_may_not_reuse_it_and_resume_continues_it(tmp_path):
    named = Path(_train(tmp_path, run_id="baseline").ckpt_dir)
    assert named == tmp_path / "exp" / "baseline"
    with pytest.raises(ValueError, match="run_id.*already holds a run; set resume: true"):
        _train(tmp_path, run_id="baseline")
    later = Path(_train(tmp_path).ckpt_dir)  # a newer RUN_ dir: resume with run_id still picks "baseline"
    resumed = _train(tmp_path, epochs=2, run_id="baseline", resume=True)
    assert Path(resumed.ckpt_dir) == named and [h["epoch"] for h in resumed.history] == [0, 1]
    assert read_checkpoint(later / "ckpt_latest.pth")["epoch"] == 1
    with pytest.raises(ValueError, match="training_params.run_id"):
        _train(tmp_path, run_id="../elsewhere")


def test_resume_path_trains_in_a_new_run_dir(tmp_path):
    first = Path(_train(tmp_path).ckpt_dir)
    before = _snapshot(first)
    resumed = _train(tmp_path, epochs=2, resume_path=str(first / "ckpt_latest.pth"))
    assert Path(resumed.ckpt_dir) != first and [h["epoch"] for h in resumed.history] == [0, 1]
    assert _snapshot(first) == before


def test_a_0_2_flat_experiment_dir_resumes_into_a_new_run_dir_leaving_its_files(tmp_path):
    run = Path(_train(tmp_path, epochs=1).ckpt_dir)
    flat = tmp_path / "exp"
    for path in run.iterdir():  # the 0.2 layout: the files directly in the experiment dir
        shutil.move(str(path), flat / path.name)
    run.rmdir()
    before = _snapshot(flat)
    resumed = _train(tmp_path, epochs=3, resume=True)
    assert Path(resumed.ckpt_dir).parent == flat and RUN_NAME.fullmatch(Path(resumed.ckpt_dir).name)
    assert [h["epoch"] for h in resumed.history] == [0, 1, 2]
    assert read_checkpoint(Path(resumed.ckpt_dir) / "ckpt_latest.pth")["epoch"] == 3
    assert {k: v for k, v in _snapshot(flat).items() if len(k.parts) == 1} == before  # the 0.2 files as they were
    again = _train(tmp_path, epochs=4, resume=True)  # the next resume finds the new run dir
    assert again.ckpt_dir == resumed.ckpt_dir and len(again.history) == 4


def test_a_failed_start_leaves_no_empty_run_dir(tmp_path):
    with pytest.raises(RuntimeError, match="checkpoint not found"):
        _train(tmp_path, resume_path=str(tmp_path / "missing.pth"))
    assert not (tmp_path / "exp").exists()


def test_the_lock_refuses_a_second_trainer_in_the_same_process(tmp_path):
    with RunLock(tmp_path / "exp" / "shared"):
        with pytest.raises(RunLockedError, match=f"in use by this process.*pid {os.getpid()}|in use by this process"):
            RunLock(tmp_path / "exp" / "shared").acquire()
    with RunLock(tmp_path / "exp" / "shared") as lock:  # released: free again
        assert lock.held


def _worker(root, *args):
    return subprocess.Popen([PYTHON, WORKER, "--root", str(root), *args], env=python_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def test_the_lock_refuses_a_second_live_process_and_a_dead_owner_s_lock_is_taken_over(tmp_path):
    marker, release = tmp_path / "started", tmp_path / "release"
    owner = _worker(tmp_path, "--run-id", "shared", "--hold", str(marker), str(release))
    try:
        deadline = time.monotonic() + 120
        while not marker.exists() and owner.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert marker.exists(), owner.communicate()
        second = _worker(tmp_path, "--run-id", "shared", "--resume")
        out, err = second.communicate(timeout=120)
        assert second.returncode == 3, (out, err)
        refusal = err.strip().splitlines()[-1]  # after the warning that the run has no checkpoint yet
        assert refusal.startswith("RunLockedError: run dir") and f"in use by pid {owner.pid} on host" in refusal
    finally:
        release.write_text("go")
        out, err = owner.communicate(timeout=120)
    assert owner.returncode == 0, err
    assert read_checkpoint(tmp_path / "locked" / "shared" / "ckpt_latest.pth")["epoch"] == 1

    dead = _worker(tmp_path, "--run-id", "crashed", "--die")
    dead.communicate(timeout=120)
    assert dead.returncode == 17 and (tmp_path / "locked" / "crashed" / LOCK_FILE).is_file()
    taker = _worker(tmp_path, "--run-id", "crashed", "--resume")
    out, err = taker.communicate(timeout=120)
    assert taker.returncode == 0, err
    assert f"taking over the lock left by pid {dead.pid}" in err
    assert not (tmp_path / "locked" / "crashed" / LOCK_FILE).exists()


def test_latest_run_dir_orders_by_name(tmp_path):
    for name in ("RUN_20240101_000000_000002", "RUN_20240101_000000_000010", "custom"):
        (tmp_path / name).mkdir()
        torch.save({}, tmp_path / name / "ckpt_latest.pth")
    assert latest_run_dir(tmp_path).name == "RUN_20240101_000000_000010"  # custom names are not "latest" candidates
