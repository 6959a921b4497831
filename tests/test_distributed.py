"""Two processes under torchrun with gloo on CPU (SPEC §6)."""
from __future__ import annotations

import subprocess

import pytest
import torch

from conftest import PYTHON, ROOT, only_run, python_env
from super_trainer.checkpoint import read_checkpoint

WORKER = str(ROOT / "tests" / "_ddp_worker.py")


def torchrun(tmp_path, *flags, name="out", root="ckpt"):
    out = tmp_path / name
    out.mkdir()
    cmd = [PYTHON, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           WORKER, "--root", str(tmp_path / root), "--out", str(out), *flags]
    proc = subprocess.run(cmd, env=python_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in (0, 1)]


def single_process(tmp_path, *flags):
    """The same training in one process, with batches of 16: what the 2 ranks' batches of 8 add up to."""
    out = tmp_path / "single"
    out.mkdir()
    env = python_env()
    env["OMP_NUM_THREADS"] = "1"  # as torchrun sets for its ranks, so the arithmetic is the same
    proc = subprocess.run([PYTHON, WORKER, "--root", str(tmp_path / "single_ckpt"), "--out", str(out), "--batch", "16",
                           *flags], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return torch.load(out / "rank0.pt", weights_only=True)


def assert_like_one_process(ranks, single):
    """Both ranks hold the same weights, those of one process to 1e-6 (only the order of the sums differs), and
    validation over their disjoint, unpadded shares (9 + 8 of 17 samples) gives one process's metrics."""
    assert [r["world"] for r in ranks] == [2, 2] and single["world"] == 1
    for key, value in single["net"].items():
        torch.testing.assert_close(ranks[0]["net"][key], value, rtol=0, atol=1e-6)
        assert torch.equal(ranks[0]["net"][key], ranks[1]["net"][key])
    assert ranks[0]["metrics"] == ranks[1]["metrics"]
    assert ranks[0]["metrics"]["Accuracy"] == single["metrics"]["Accuracy"]
    assert ranks[0]["metrics"]["CrossEntropyLoss"] == pytest.approx(single["metrics"]["CrossEntropyLoss"], abs=1e-6)


def test_two_ranks_shard_the_users_loaders_and_match_a_single_process(tmp_path):
    ranks = torchrun(tmp_path)
    assert_like_one_process(ranks, single_process(tmp_path))
    # the user's plain loaders were sharded: disjoint train shares with a warning, disjoint unpadded valid shares
    assert set(ranks[0]["train_share"]).isdisjoint(ranks[1]["train_share"])
    assert sorted(ranks[0]["train_share"] + ranks[1]["train_share"]) == list(range(64))
    assert sorted(ranks[0]["valid_share"] + ranks[1]["valid_share"]) == list(range(17))
    for rank in ranks:
        assert [w for w in rank["warnings"] if "DistributedSampler" in w] == [
            "train_loader has no DistributedSampler: re-created with one (shuffle=False) so that each of the 2 ranks "
            "trains on its own share; set training_params.distributed_sampler: false to use it as given"]
    # one gradient all-reduce per optimizer step: 4 batches an epoch, 3 epochs
    assert [r["all_reduces"] for r in ranks] == [3 * 4] * 2
    run = only_run(tmp_path / "ckpt" / "ddp")
    assert [r["ckpt_dir"] for r in ranks] == [str(run)] * 2  # every rank took rank 0's run dir
    files = sorted(p.name for p in run.iterdir())
    assert "ckpt_latest.pth" in files and not [f for f in files if f.endswith(".tmp")]


def test_accumulation_cut_by_ctrl_c_on_one_rank_resumes_exactly(tmp_path):
    """batch_accumulate 2: no_sync inside a window (one all-reduce per step). Ctrl-C on rank 1 after the first
    batch of a window stops both ranks there; each rank's own half-window of gradients is in the checkpoint, so
    the resumed run ends with the uninterrupted run's weights, bit for bit."""
    flags = ["--accumulate", "2"]
    whole = torchrun(tmp_path, *flags)
    assert_like_one_process(whole, single_process(tmp_path, *flags))
    assert [r["all_reduces"] for r in whole] == [3 * 4 // 2] * 2

    cut = torchrun(tmp_path, *flags, "--ctrl-c", name="cut", root="cut")
    assert [r["stop_reason"] for r in cut] == ["interrupted"] * 2
    latest = read_checkpoint(only_run(tmp_path / "cut" / "ddp") / "ckpt_latest.pth")
    progress = latest["epoch_progress"]
    assert (latest["epoch"], progress["batches"], latest["world_size"]) == (1, 3, 2)
    own_grads = [share["grads"] for share in progress["ranks"]]
    assert not torch.equal(own_grads[0]["0.weight"], own_grads[1]["0.weight"])  # the window's local gradients

    resumed = torchrun(tmp_path, *flags, "--resume", name="resumed", root="cut")
    for key, value in whole[0]["net"].items():
        assert torch.equal(resumed[0]["net"][key], value), key
        assert torch.equal(resumed[1]["net"][key], value), key
    assert resumed[0]["metrics"] == whole[0]["metrics"]


def test_uneven_batches_and_different_checkpoints_fail_on_every_rank(tmp_path):
    ranks = torchrun(tmp_path, "--errors")
    for rank in ranks:
        assert "rank 0: 3, rank 1: 2" in rank["uneven"] and "max_train_batches" in rank["uneven"]
        assert rank["uneven_seconds"] < 30
        assert "the ranks read different checkpoints" in rank["mismatch"]
        assert "rank 0: " in rank["mismatch"] and "(epoch 1," in rank["mismatch"] and "(epoch 2," in rank["mismatch"]
    assert ranks[0]["uneven"] == ranks[1]["uneven"] and ranks[0]["mismatch"] == ranks[1]["mismatch"]
    # an evaluation share without a batch (1 sample, 2 ranks) neither hangs nor changes the result
    assert ranks[0]["one_sample"] == ranks[1]["one_sample"]
    assert ranks[0]["one_sample"]["Accuracy"] in (0.0, 1.0) and ranks[0]["one_sample"]["CrossEntropyLoss"] > 0


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
