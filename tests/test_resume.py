"""Kill-and-resume is bit-exact on CPU (SPEC §3)."""
from __future__ import annotations

import subprocess

import pytest
import torch

from conftest import PYTHON, ROOT, python_env
from super_trainer.checkpoint import read_checkpoint

WORKER = str(ROOT / "tests" / "_resume_worker.py")


def run_worker(mode, root, out, flags):
    return subprocess.run([PYTHON, WORKER, "--mode", mode, "--root", str(root), "--out", str(out), *flags],
                          env=python_env(), capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("flags", [[], ["--ema", "--amp"]], ids=["plain", "ema+bf16"])
def test_killed_then_resumed_equals_uninterrupted(tmp_path, flags):
    full = run_worker("full", tmp_path / "a", tmp_path / "full.pt", flags)
    assert full.returncode == 0, full.stderr

    killed = run_worker("killed", tmp_path / "b", tmp_path / "never.pt", flags)
    assert killed.returncode == 17, killed.stderr  # died hard at the start of epoch 2
    partial = read_checkpoint(tmp_path / "b" / "exp" / "ckpt_latest.pth")
    assert partial["epoch"] == 2

    resumed = run_worker("resume", tmp_path / "b", tmp_path / "resumed.pt", flags)
    assert resumed.returncode == 0, resumed.stderr

    a = torch.load(tmp_path / "full.pt", weights_only=True)
    b = torch.load(tmp_path / "resumed.pt", weights_only=True)
    for key, value in a["net"].items():
        assert torch.equal(value, b["net"][key]), key
    assert b["epochs"] == [0, 1, 2, 3]  # history carried over from the checkpoint
    assert a["count"] == b["count"]  # the stateful callback was restored, not restarted
    assert a["best_metric"] == b["best_metric"]
    latest_a = read_checkpoint(tmp_path / "a" / "exp" / "ckpt_latest.pth")
    latest_b = read_checkpoint(tmp_path / "b" / "exp" / "ckpt_latest.pth")
    if "--ema" in flags:
        for key, value in latest_a["ema_net"].items():
            assert torch.equal(value, latest_b["ema_net"][key]), key
    assert latest_a["global_step"] == latest_b["global_step"]


def test_resume_can_raise_max_epochs(tmp_path):
    from conftest import make_loader, make_model, quiet_params
    from super_trainer import Trainer

    model = make_model()
    Trainer("grow", tmp_path).train(model=model, training_params=quiet_params(max_epochs=2),
                                    train_loader=make_loader(), valid_loader=make_loader(16))
    result = Trainer("grow", tmp_path).train(model=make_model(), training_params=quiet_params(max_epochs=3, resume=True),
                                             train_loader=make_loader(), valid_loader=make_loader(16))
    assert [h["epoch"] for h in result.history] == [0, 1, 2]
    assert read_checkpoint(tmp_path / "grow" / "ckpt_latest.pth")["epoch"] == 3
