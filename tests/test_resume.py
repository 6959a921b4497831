"""Kill-and-resume is bit-exact on CPU (SPEC §3)."""
from __future__ import annotations

import subprocess

import pytest
import torch

from conftest import PYTHON, ROOT, only_run, python_env
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
    partial = read_checkpoint(only_run(tmp_path / "b" / "exp") / "ckpt_latest.pth")
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
    latest_a = read_checkpoint(only_run(tmp_path / "a" / "exp") / "ckpt_latest.pth")
    latest_b = read_checkpoint(only_run(tmp_path / "b" / "exp") / "ckpt_latest.pth")
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
    assert read_checkpoint(only_run(tmp_path / "grow") / "ckpt_latest.pth")["epoch"] == 3


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """The worker's run without interruption (checkpoint cadence does not change the weights)."""
    root = tmp_path_factory.mktemp("uninterrupted")
    full = run_worker("full", root / "a", root / "full.pt", [])
    assert full.returncode == 0, full.stderr
    return root / "full.pt"


def _assert_same_run(full_out, resumed_out):
    a = torch.load(full_out, weights_only=True)
    b = torch.load(resumed_out, weights_only=True)
    for key, value in a["net"].items():
        assert torch.equal(value, b["net"][key]), key
    assert a["count"] == b["count"]
    assert b["epochs"] == [0, 1, 2, 3]
    assert a["train_losses"] == b["train_losses"]  # the resumed epoch's average covers the whole epoch
    assert a["history"] == b["history"]  # train metrics (Accuracy) too: their states are in the mid-epoch record
    assert "train/Accuracy" in b["history"][1]
    assert a["best_metric"] == b["best_metric"]


# The worker: 6 batches per epoch, batch_accumulate 2 (3 steps per epoch), 4 epochs, shuffle, dropout, momentum,
# warmup (1 epoch) + cosine. With save_ckpt_every_n_steps=2 ckpt_latest is written after step 2 (epoch 0,
# batch 3), step 4 (epoch 1, batch 1), step 8 (epoch 2, batch 3), ... (epoch ends write their own).
# With every=1, the kill at batch 10 resumes inside the warmup's last epoch after a cosine step: the
# checkpoint's lr (not the warmup's epoch-start value) must be put back.
@pytest.mark.parametrize("every,kill_batch,position", [(2, 8, (1, 2)), (2, 9, (1, 2)), (1, 10, (1, 4))],
                         ids=["right-after-a-step-checkpoint", "between-two-checkpoints", "after-a-cosine-step"])
def test_hard_kill_mid_epoch_resumes_bit_exact(tmp_path, uninterrupted, every, kill_batch, position):
    flags = ["--every", str(every)]
    killed = run_worker("killed", tmp_path / "b", tmp_path / "never.pt", [*flags, "--kill-batch", str(kill_batch)])
    assert killed.returncode == 17, killed.stderr
    partial = read_checkpoint(only_run(tmp_path / "b" / "exp") / "ckpt_latest.pth")
    assert (partial["epoch"], partial["epoch_progress"]["batches"]) == position
    resumed = run_worker("resume", tmp_path / "b", tmp_path / "resumed.pt", flags)
    assert resumed.returncode == 0, resumed.stderr
    _assert_same_run(uninterrupted, tmp_path / "resumed.pt")


def test_ctrl_c_mid_window_checkpoints_the_batch_and_resumes_bit_exact(tmp_path, uninterrupted):
    # SIGINT during epoch 1's batch 2: the first micro-batch of a window, so gradients are pending
    stopped = run_worker("killed", tmp_path / "b", tmp_path / "stopped.pt", ["--sigint-batch", "8"])
    assert stopped.returncode == 0, stopped.stderr
    assert torch.load(tmp_path / "stopped.pt", weights_only=True)["stop_reason"] == "interrupted"
    partial = read_checkpoint(only_run(tmp_path / "b" / "exp") / "ckpt_latest.pth")
    assert (partial["epoch"], partial["epoch_progress"]["batches"]) == (1, 3)
    assert partial["epoch_progress"]["grads"]  # the window's first half is carried over
    resumed = run_worker("resume", tmp_path / "b", tmp_path / "resumed.pt", [])
    assert resumed.returncode == 0, resumed.stderr
    _assert_same_run(uninterrupted, tmp_path / "resumed.pt")


def test_sigterm_from_outside_mid_epoch_checkpoints_the_batch_and_resumes_bit_exact(tmp_path, uninterrupted):
    """What a cluster scheduler does before SIGKILL: the running batch finishes, ckpt_latest is written at it and
    lands before the process exits normally; the resumed run equals the uninterrupted one, history included."""
    import os
    import signal
    import time

    marker = tmp_path / "at_batch"
    cmd = [PYTHON, WORKER, "--mode", "killed", "--root", str(tmp_path / "b"), "--out", str(tmp_path / "stopped.pt"),
           "--sigterm-batch", "8", "--marker", str(marker)]
    proc = subprocess.Popen(cmd, env=python_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert marker.exists(), proc.communicate()[1][-3000:]
    os.kill(proc.pid, signal.SIGTERM)
    _, stderr = proc.communicate(timeout=240)
    assert proc.returncode == 0, stderr[-3000:]
    assert torch.load(tmp_path / "stopped.pt", weights_only=True)["stop_reason"] == "terminated"
    partial = read_checkpoint(only_run(tmp_path / "b" / "exp") / "ckpt_latest.pth")
    assert (partial["epoch"], partial["epoch_progress"]["batches"]) == (1, 3)
    assert partial["epoch_progress"]["metric_states"]["Accuracy"]["update_count"] == 3
    resumed = run_worker("resume", tmp_path / "b", tmp_path / "resumed.pt", [])
    assert resumed.returncode == 0, resumed.stderr
    _assert_same_run(uninterrupted, tmp_path / "resumed.pt")
