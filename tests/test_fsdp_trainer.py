"""FSDP2 through ``Trainer.train`` (SPEC §8 "Scale"): two CPU ranks under torchrun (one launch) against one process.

tests/_fsdp_trainer_worker.py does the training; test_scale.py tests the building blocks with a hand-written loop.
"""
from __future__ import annotations

import copy
import subprocess
from pathlib import Path

import pytest
import torch

import _fsdp_trainer_worker as worker
from conftest import PYTHON, ROOT, only_run, python_env

WORKER = str(ROOT / "tests" / "_fsdp_trainer_worker.py")


def _launch(tmp_path, name, *prefix):
    out, root = tmp_path / f"{name}_out", tmp_path / f"{name}_ckpt"
    out.mkdir()
    env = python_env()
    env["OMP_NUM_THREADS"] = "1"  # as torchrun sets for its ranks, so the arithmetic is the same
    proc = subprocess.run([PYTHON, *prefix, WORKER, "--root", str(root), "--out", str(out)]
                          + ([] if prefix else ["--single"]), env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return root, [torch.load(path, weights_only=True) for path in sorted(out.glob("rank*.pt"))]


def _close(actual, expected, atol=1e-6):
    assert sorted(actual) == sorted(expected)
    for key, value in expected.items():
        torch.testing.assert_close(actual[key], value, rtol=0, atol=atol, msg=key)


def test_fsdp_true_trains_checkpoints_and_resumes_like_one_process(tmp_path):
    root, ranks = _launch(tmp_path, "fsdp", "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2")
    single_root, (single,) = _launch(tmp_path, "single")
    first, second = ranks
    assert [r["world"] for r in ranks] == [2, 2] and single["world"] == 1

    # 2 ranks, half of each global batch each, AdamW + clipping + EMA: the single-process weights to 1e-6
    _close(first["a"]["net"], single["a"]["net"])
    _close(first["b"]["net"], single["b"]["net"])
    assert first["a"]["test"]["Accuracy"] == second["a"]["test"]["Accuracy"] == single["a"]["test"]["Accuracy"]
    assert first["a"]["last_norm"] == second["a"]["last_norm"]  # the global norm, the same on every rank
    assert first["a"]["last_norm"] == pytest.approx(single["a"]["last_norm"], rel=1e-6)
    assert first["a"]["net_type"] == "FSDPSequential"  # the sharded module itself: no DDP around it
    # validation over uneven unpadded shares (rank 0: 2 batches, rank 1: 1 and one uncounted repeat) = one process
    assert (first["a"]["valid_batches"], second["a"]["valid_batches"], single["a"]["valid_batches"]) == (4, 2, 6)
    assert first["a"]["metrics"]["Accuracy"] == second["a"]["metrics"]["Accuracy"] == single["a"]["metrics"]["Accuracy"]

    # a resume of the 2-epoch FSDP run to 3 epochs equals the uninterrupted 3-epoch FSDP run, bit for bit
    resumed = first["resumed"]
    assert resumed["ckpt_dir"] == first["a"]["ckpt_dir"]
    for key, value in first["b"]["net"].items():
        assert torch.equal(resumed["net"][key], value), key
    resumed_ckpt = torch.load(only_run(root / "a") / "ckpt_latest.pth", weights_only=True)
    b_ckpt = torch.load(only_run(root / "b") / "ckpt_latest.pth", weights_only=True)
    assert resumed_ckpt["epoch"] == b_ckpt["epoch"] == 3
    for key, value in b_ckpt["ema_net"].items():
        assert torch.equal(resumed_ckpt["ema_net"][key], value), key

    # batch_accumulate (FSDP2 reduce-scatters every micro-batch), and a Ctrl-C inside a window: the checkpoint holds
    # the window's full gradients (gathered), and the resumed run ends as the uninterrupted one
    _close(first["c"]["net"], single["c"]["net"])
    assert first["d"]["stop_reason"] == second["d"]["stop_reason"] == single["d"]["stop_reason"] == "interrupted"
    assert first["d"]["progress"]["batches"] == single["d"]["progress"]["batches"] == 3
    _close(first["d"]["progress"]["grads"], single["d"]["progress"]["grads"])
    for key, value in first["c"]["net"].items():
        assert torch.equal(first["d_resumed"]["net"][key], value), key

    # ckpt_latest holds full, plain state dicts: they load into a plain model and optimizer, equal to one process's
    single_ckpt = torch.load(only_run(single_root / "b") / "ckpt_latest.pth", weights_only=True)
    model = worker.make_model(seed=3)
    model.load_state_dict(b_ckpt["net"])
    _close(model.state_dict(), first["b"]["net"], atol=0)
    _close(b_ckpt["net"], single_ckpt["net"])
    _close(b_ckpt["ema_net"], single_ckpt["ema_net"])
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.05, weight_decay=0.01)
    optimizer.load_state_dict(copy.deepcopy(b_ckpt["optimizer_state_dict"]))
    assert b_ckpt["optimizer_type"] == "AdamW"
    mine, reference = optimizer.state_dict(), single_ckpt["optimizer_state_dict"]
    assert [len(g["params"]) for g in mine["param_groups"]] == [len(g["params"]) for g in reference["param_groups"]]
    for index, state in reference["state"].items():  # AdamW's step and moments, parameter by parameter
        _close(mine["state"][index], state)
    # ckpt_best holds the EMA weights as its net, as without FSDP
    best = torch.load(only_run(root / "b") / "ckpt_best.pth", weights_only=True)
    single_best = torch.load(only_run(single_root / "b") / "ckpt_best.pth", weights_only=True)
    assert best["epoch"] == single_best["epoch"]
    _close(best["net"], best["ema_net"], atol=0)
    _close(best["net"], single_best["net"])

    # torch_compile around the sharded module (EMA bound through the wrapper): the same training
    assert first["compiled"]["net_type"] == "OptimizedModule"
    _close(first["compiled"]["net"], first["a"]["net"], atol=0)
    # a model the user sharded with fully_shard (fsdp: false) trains as it is: as fsdp: true
    assert first["given"]["net_type"] == "FSDPSequential"
    _close(first["given"]["net"], first["a"]["net"], atol=0)
    # the user's DistributedDataParallel(find_unused_parameters=True) is kept, option and all
    assert first["ddp"] == second["ddp"] == {"net_type": "DistributedDataParallel", "find_unused": True}
    # ... but not with a train_step (the trainer averages the gradients itself), which a warning says
    assert len(first["ddp_step"]) == 1 and "not used with a train_step" in first["ddp_step"][0]

    errors = first["errors"]
    assert "FullyShardedDataParallel (FSDP1) is not supported" in errors["fsdp1"]
    assert errors["train_step"].startswith("training_params.train_step:") and "FSDP2" in errors["train_step"]
    assert errors["average"].startswith("training_params.average_best_models:")
    assert "does not fit this model" in errors["misfit"] and "0.weight" in errors["misfit"]
    assert second["errors"] == errors


def test_fsdp_true_on_one_process_trains_the_plain_model(tmp_path):
    """No process group: nothing to shard over, so the model stays plain, and warnings say so (also that sharded
    checkpoints cannot apply)."""
    from conftest import make_loader, make_model, quiet_params
    from super_trainer import Trainer

    model = make_model()
    with pytest.warns(UserWarning) as caught:
        Trainer("one", tmp_path, device="cpu").train(model=model, training_params=quiet_params(
            fsdp=True, fsdp_params={"checkpoint": "sharded"}, max_epochs=1),
            train_loader=make_loader(16, 8), valid_loader=make_loader(8, 8))
    messages = [str(w.message) for w in caught]
    assert any("training_params.fsdp: true in a single process" in m for m in messages)
    assert any("fsdp_params.checkpoint: 'sharded' applies to an FSDP2 model under torchrun only" in m
               for m in messages)
    assert all(type(p) is torch.nn.Parameter for p in model.parameters())


def test_the_documented_cli_override_shards_the_recipe_model(tmp_path):
    """docs/distributed.md: ``super-trainer --nproc N --config-name=... training_hyperparams.fsdp=true``."""
    cli = str(Path(PYTHON).parent / "super-trainer")
    args = ["--nproc", "2", "training_hyperparams.max_epochs=1", "training_hyperparams.progress_bar=false",
            "training_hyperparams.fsdp=true", f"ckpt_root_dir={tmp_path}", "experiment_name=fsdp", "device=cpu"]
    proc = subprocess.run([cli, *args], cwd=tmp_path, env=python_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "fsdp: the model is sharded over 2 ranks" in proc.stdout + proc.stderr
    checkpoint = torch.load(only_run(tmp_path / "fsdp") / "ckpt_latest.pth", weights_only=True)  # plain tensors
    assert checkpoint["epoch"] == 1 and all(type(v) is torch.Tensor for v in checkpoint["net"].values())


def test_sharded_checkpoints_hold_one_file_per_rank_and_resume_exactly(tmp_path):
    """fsdp_params.checkpoint: sharded — every rank writes its own shards (no full state dict anywhere); the .pth
    files name the shard dir; a resume continues bit for bit; the shards gather into a plain state_dict offline."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    from super_trainer.checkpoint import CheckpointError, load_checkpoint_to_model

    root, ranks = _launch(tmp_path, "fsdp", "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2")
    first = ranks[0]
    # checkpoint mode does not change training: the resumed sharded run ends as the uninterrupted 3-epoch run
    for key, value in first["b"]["net"].items():
        assert torch.equal(first["s_resumed"]["net"][key], value), key
    run_dir = only_run(root / "s")
    latest = torch.load(run_dir / "ckpt_latest.pth", weights_only=True)
    best = torch.load(run_dir / "ckpt_best.pth", weights_only=True)
    assert latest["net"] is None and latest["optimizer_state_dict"] is None and latest["ema_net"] is None
    assert latest["sharded"] == f"shards/step_{latest['global_step']}" and best["sharded_net"] == "ema"
    shard_dir = run_dir / latest["sharded"]
    assert sorted(p.name for p in shard_dir.iterdir()) == [".metadata", "__0_0.distcp", "__1_0.distcp"]
    named = {torch.load(f, weights_only=True)["sharded"] for f in run_dir.glob("*.pth")}
    assert {f"shards/{d.name}" for d in (run_dir / "shards").iterdir()} == named  # older shard dirs were pruned

    # offline, in one process: torch's converter gathers the shards into the run's weights (= a full checkpoint's)
    dcp_to_torch_save(shard_dir, tmp_path / "full.pt")
    gathered = torch.load(tmp_path / "full.pt", weights_only=True)
    full_run = torch.load(only_run(root / "b") / "ckpt_latest.pth", weights_only=True)
    for key, value in full_run["net"].items():
        assert torch.equal(gathered["model"][key], value), key
        assert torch.equal(gathered["ema"][key], full_run["ema_net"][key]), key
    with pytest.raises(CheckpointError, match=r"torch.distributed.checkpoint shards in .*dcp_to_torch_save"):
        load_checkpoint_to_model(worker.make_model(), run_dir / "ckpt_latest.pth")


def test_fsdp_job_killed_on_one_rank_is_restarted_by_torchrun_and_ends_as_if_uninterrupted(tmp_path):
    """The fault-tolerant command of docs/distributed.md with FSDP2: rank 1 dies in the middle of an accumulation
    window; torchrun restarts both ranks, resume: auto continues from the last step checkpoint (full state
    scattered back into the shards), and the run ends with the weights of the same run never killed."""
    out, root = tmp_path / "out", tmp_path / "ckpt"
    out.mkdir()
    env = python_env()
    env["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] = "1"
    proc = subprocess.run([PYTHON, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                           "--max-restarts=1", WORKER, "--root", str(root), "--out", str(out), "--die"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    assert "exitcode: 17" in proc.stderr  # rank 1 did die
    ranks = [torch.load(out / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    first = ranks[0]
    assert [r["k"]["restart_count"] for r in ranks] == [1, 1]
    assert first["k"]["stop_reason"] == "completed" and first["k"]["ckpt_dir"] == str(only_run(root / "k"))
    for key, value in first["k_whole"]["net"].items():
        assert torch.equal(first["k"]["net"][key], value), key
    assert first["k"]["metrics"] == first["k_whole"]["metrics"]

