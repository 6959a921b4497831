"""Two processes under torchrun with gloo on CPU (SPEC §6)."""
from __future__ import annotations

import subprocess

import pytest
import torch

from conftest import PYTHON, ROOT, only_run, python_env

WORKER = str(ROOT / "tests" / "_ddp_worker.py")


def torchrun(tmp_path, *flags):
    out = tmp_path / "out"
    out.mkdir()
    cmd = [PYTHON, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           WORKER, "--root", str(tmp_path / "ckpt"), "--out", str(out), *flags]
    proc = subprocess.run(cmd, env=python_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in (0, 1)]


@pytest.mark.parametrize("accumulate", [1, 2])
def test_two_ranks_match_a_single_process(tmp_path, accumulate):
    flags = ["--accumulate", str(accumulate)]
    ranks = torchrun(tmp_path, *flags)
    single_out = tmp_path / "single"
    single_out.mkdir()
    env = python_env()
    env["OMP_NUM_THREADS"] = "1"  # as torchrun sets for its ranks, so the arithmetic is the same
    proc = subprocess.run([PYTHON, WORKER, "--root", str(tmp_path / "single_ckpt"), "--out", str(single_out), *flags],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    single = torch.load(single_out / "rank0.pt", weights_only=True)
    assert [r["world"] for r in ranks] == [2, 2] and single["world"] == 1
    for key, value in single["net"].items():
        # both ranks see the same batches, so the averaged gradient, (g + g) / 2, is the single-process one
        assert torch.equal(ranks[0]["net"][key], value), key
        assert torch.equal(ranks[0]["net"][key], ranks[1]["net"][key])
    assert ranks[0]["metrics"] == ranks[1]["metrics"]
    # one gradient all-reduce per optimizer step: 4 batches an epoch, 3 epochs, no_sync inside a window
    assert [r["all_reduces"] for r in ranks] == [3 * 4 // accumulate] * 2
    run = only_run(tmp_path / "ckpt" / "ddp")
    assert [r["ckpt_dir"] for r in ranks] == [str(run)] * 2  # every rank took rank 0's run dir
    files = sorted(p.name for p in run.iterdir())
    assert "ckpt_latest.pth" in files and not [f for f in files if f.endswith(".tmp")]


def test_a_stop_on_one_rank_stops_every_rank(tmp_path):
    ranks = torchrun(tmp_path, "--stop")
    assert [r["stop_reason"] for r in ranks] == ["stopped_by_callback"] * 2
    assert [r["epochs"] for r in ranks] == [[0], [0]]
    for key, value in ranks[0]["net"].items():
        assert torch.equal(value, ranks[1]["net"][key])


def test_sigterm_to_torchrun_stops_every_rank_at_the_same_batch_with_a_checkpoint(tmp_path):
    """torchrun forwards SIGTERM to every rank: they stop together after the running batch, agree on the reason,
    and rank 0 writes ckpt_latest at that batch before the processes exit."""
    import signal
    import time

    from super_trainer.checkpoint import read_checkpoint

    out, marker = tmp_path / "out", tmp_path / "ready"
    out.mkdir()
    cmd = [PYTHON, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", WORKER, "--root",
           str(tmp_path / "ckpt"), "--out", str(out), "--sigterm-marker", str(marker)]
    proc = subprocess.Popen(cmd, env=python_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert marker.exists(), proc.communicate()[1][-3000:]
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=240)
    ranks = [torch.load(out / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert [r["stop_reason"] for r in ranks] == ["terminated"] * 2, stderr[-3000:]
    assert [r["all_reduces"] for r in ranks] == [4 + 2] * 2  # epoch 0's 4 steps, then batches 0 and 1 of epoch 1
    latest = read_checkpoint(only_run(tmp_path / "ckpt" / "ddp") / "ckpt_latest.pth")
    assert (latest["epoch"], latest["epoch_progress"]["batches"]) == (1, 2)
    for key, value in ranks[0]["net"].items():
        assert torch.equal(value, ranks[1]["net"][key])
        assert torch.equal(value, latest["net"][key])
