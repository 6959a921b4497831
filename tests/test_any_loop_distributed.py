"""SPEC §8 shapes under torchrun (two processes, gloo on CPU): a GAN's two optimizers, a Hugging Face model's dict
batches and a contrastive train_step, with accumulation, each equal to one process on the same batches."""
from __future__ import annotations

import subprocess

import torch

from conftest import PYTHON, ROOT, python_env

WORKER = str(ROOT / "tests" / "_any_ddp_worker.py")


def test_every_shape_under_two_ranks_matches_a_single_process(tmp_path):
    out, single_out = tmp_path / "out", tmp_path / "single"
    out.mkdir()
    single_out.mkdir()
    cmd = [PYTHON, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", WORKER,
           "--root", str(tmp_path / "ckpt"), "--out", str(out)]
    proc = subprocess.run(cmd, env=python_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    env = python_env()
    env["OMP_NUM_THREADS"] = "1"  # as torchrun sets for its ranks, so the arithmetic is the same
    proc = subprocess.run([PYTHON, WORKER, "--root", str(tmp_path / "single_ckpt"), "--out", str(single_out)],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [torch.load(out / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    single = torch.load(single_out / "rank0.pt", weights_only=True)
    assert [r["world"] for r in ranks] == [2, 2] and single["world"] == 1
    for shape in ("gan", "text", "contrastive"):
        for key, value in single[shape].items():
            # both ranks see the same batches, so the averaged gradient, (g/2 + g/2), is the single-process one
            assert torch.equal(ranks[0][shape][key], value), (shape, key)
            assert torch.equal(ranks[1][shape][key], value), (shape, key)
    # the trainer's own all-reduce for train_steps: once per optimizer, on stepping micro-batches only
    # (4 batches an epoch, batch_accumulate 2, 3 epochs, 2 optimizers); none in one process
    assert [r["gan_syncs"] for r in ranks] == [3 * 2 * 2] * 2 and single["syncs"] == 0
    assert [r["syncs"] for r in ranks] == [3 * 2 * 2 + 3 * 3] * 2  # + the contrastive step: 5 batches, 3 windows
