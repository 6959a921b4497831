"""SPEC §8 "Scale": FSDP2, data sharding, resume: auto, the stop vote — and the launch commands of
docs/distributed.md, run as written (two torchrun launches in all; the rest runs in this process)."""
from __future__ import annotations

import copy
import shlex
import socket
import subprocess
import uuid
import warnings

import pytest
import torch
import torch.nn as nn
from torch.utils.data import BatchSampler, DataLoader, IterableDataset, RandomSampler, TensorDataset
from torch.utils.data import WeightedRandomSampler

import _fsdp_worker
import _scale_worker
from conftest import PYTHON, ROOT, python_env
from super_trainer import distributed, sharding
from super_trainer.ema import ModelEMA
from super_trainer.elastic import resume_decision
from super_trainer.fsdp import checked_fsdp_params, default_blocks
from super_trainer.params import resolve_training_params

DOC = ROOT / "docs" / "distributed.md"
TESTS = ROOT / "tests"


def doc_command(start: str, script: str, **replace: str):
    """(env, argv) of the line of docs/distributed.md that starts with ``start``: ``VAR=value`` prefixes go to
    the environment, torchrun becomes ``python -m torch.distributed.run``, train.py the worker script."""
    line = next(line for line in DOC.read_text().splitlines() if line.startswith(start))
    for old, new in replace.items():
        assert old in line, (old, line)
        line = line.replace(old, new)
    tokens = shlex.split(line)
    env = python_env()
    while "=" in tokens[0]:
        key, value = tokens.pop(0).split("=", 1)
        env[key] = value
    assert tokens[0] == "torchrun" and tokens[-1] == "train.py", line
    return env, [PYTHON, "-m", "torch.distributed.run", *tokens[1:-1], script]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_the_one_machine_command_is_the_fault_tolerant_one_without_restarts():
    _, single = doc_command("torchrun --standalone", "w.py", **{"--nproc-per-node=4": "--nproc-per-node=2"})
    _, tolerant = doc_command("TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 torchrun", "w.py")
    assert [t for t in tolerant if not t.startswith("--max-restarts")] == single


def test_fsdp2_trains_like_one_process_and_resumes_after_torchrun_restarts_it(tmp_path):
    env, argv = doc_command("TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 torchrun", str(TESTS / "_fsdp_worker.py"))
    proc = subprocess.run(argv + ["--out", str(tmp_path)], env=env, cwd=TESTS, capture_output=True, text=True,
                          timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    first, resumed = (torch.load(tmp_path / f"attempt{a}.pt", weights_only=True) for a in (0, 1))
    reference = _fsdp_worker.reference()
    for key, value in reference["net"].items():  # 2 ranks, half a batch each, = one process: 1e-6
        torch.testing.assert_close(first["net"][key], value, rtol=0, atol=1e-6)
        torch.testing.assert_close(first["ema"][key], reference["ema"][key], rtol=0, atol=1e-6)
        # killed after the checkpoint, restarted by torchrun, resumed by resume: auto: bit for bit
        assert torch.equal(resumed["net"][key], first["net"][key])
        assert torch.equal(resumed["ema"][key], first["ema"][key])
        assert torch.equal(first["restored"][key], first["net"][key])  # EMA evaluation gave the weights back
    torch.testing.assert_close(first["norms"], reference["norms"], rtol=1e-6, atol=0)  # the global, clipped norm
    assert resumed["norms"] == first["norms"][2:]
    assert "not a restart" in first["decision"] and "restart 1" in resumed["decision"]
    assert resumed["optim"]["param_groups"] == first["optim"]["param_groups"]
    for index, state in first["optim"]["state"].items():  # AdamW's moments continue exactly too
        assert all(torch.equal(v, resumed["optim"]["state"][index][k]) for k, v in state.items())

    # validation over unpadded, uneven shares (rank 0: 2 batches, rank 1: 1) equals one process
    assert first["shares"] == 2 and torch.load(tmp_path / "attempt0_rank1.pt", weights_only=True)["shares"] == 1
    assert first["valid"][0] == reference["valid"][0]
    assert first["valid"][1] == pytest.approx(reference["valid"][1], abs=1e-6)
    ema_model = _fsdp_worker.make_model()
    ema_model.load_state_dict(reference["ema"])
    loader = DataLoader(_fsdp_worker.eval_data(), batch_size=4)
    assert first["ema_valid"] == pytest.approx(_fsdp_worker.evaluate(ema_model, loader), abs=1e-6)

    # the full checkpoint of step 2 loads into a plain model, optimizer and EMA, and training goes on there alike
    checkpoint = torch.load(tmp_path / "ckpt.pth", weights_only=True)
    model = _fsdp_worker.make_model(seed=5)
    model.load_state_dict(checkpoint["net"])
    optimizer, ema = _fsdp_worker.optimizer_for(model), ModelEMA(model, **_fsdp_worker.EMA)
    optimizer.load_state_dict(copy.deepcopy(checkpoint["optimizer_state_dict"]))  # it would share the tensors
    ema.load_state_dict(checkpoint["ema_net"])
    _fsdp_worker.train(model, optimizer, ema, range(2, 4), clip=torch.nn.utils.clip_grad_norm_)
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, first["net"][key], rtol=0, atol=1e-6)
        torch.testing.assert_close(ema.state_dict()[key], first["ema"][key], rtol=0, atol=1e-6)

    sharded = resumed["sharded"]  # the torch.distributed.checkpoint option holds the same state
    assert sharded["step"] == 2 and sorted(p.name for p in (tmp_path / "sharded").iterdir()) == [
        ".metadata", "__0_0.distcp", "__1_0.distcp"]  # one file per rank, nothing left in sharded.tmp
    for name, mine in (("net", "net"), ("ema", "ema_net")):
        assert all(torch.equal(value, checkpoint[mine][key]) for key, value in sharded[name].items())
    for index, state in checkpoint["optimizer_state_dict"]["state"].items():
        assert all(torch.equal(v, sharded["optim"]["state"][index][k]) for k, v in state.items())

    fsdp1, partial = first["errors"]
    assert "FullyShardedDataParallel (FSDP1) is not supported" in fsdp1 and "fully_shard" in fsdp1
    assert "4.weight" not in partial and "1.weight, 1.bias are not sharded" in partial


def test_a_job_killed_on_one_rank_is_restarted_and_ends_as_if_uninterrupted(tmp_path):
    """Rank 1 dies in the middle of an accumulation window (a lost node); torchrun's agent restarts both ranks,
    which resume the run from its last step checkpoint by themselves (resume: auto) and end with the weights of
    the same job never killed, bit for bit."""
    worker = str(TESTS / "_ddp_worker.py")
    env, argv = doc_command("TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 torchrun", worker)
    outputs = {}
    for name, command in (("killed", argv + ["--die"]), ("whole", [PYTHON, "-m", "torch.distributed.run",
                                                                   "--standalone", "--nproc-per-node=2", worker])):
        (tmp_path / name).mkdir()
        proc = subprocess.run(command + ["--root", str(tmp_path / f"{name}_ckpt"), "--out", str(tmp_path / name),
                                         "--accumulate", "2"], env=env, cwd=TESTS, capture_output=True, text=True,
                              timeout=300)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
        outputs[name] = [torch.load(tmp_path / name / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
        if name == "killed":
            assert "exitcode: 17" in proc.stderr  # rank 1 did die, and the job went on
    killed, whole = outputs["killed"], outputs["whole"]
    assert [r["stop_reason"] for r in killed] == ["completed"] * 2
    for key, value in whole[0]["net"].items():
        assert torch.equal(killed[0]["net"][key], value) and torch.equal(killed[1]["net"][key], value), key
    assert killed[0]["metrics"] == whole[0]["metrics"]
    assert len(list((tmp_path / "killed_ckpt" / "ddp").iterdir())) == 1  # the restart continued the same run dir


def test_two_nodes_shard_every_loader_and_agree(tmp_path):
    env, argv = doc_command("torchrun --nnodes=2", str(TESTS / "_scale_worker.py"), **{
        "--nproc-per-node=8": "--nproc-per-node=1", "HOST:29400": f"127.0.0.1:{free_port()}",
        "--rdzv-id=JOB": f"--rdzv-id={uuid.uuid4().hex[:8]}"})
    nodes = [subprocess.Popen(argv + ["--out", str(tmp_path)], env=env, cwd=TESTS, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    try:
        outputs = [node.communicate(timeout=300)[0] for node in nodes]
    finally:
        for node in nodes:
            node.kill()
    assert [node.returncode for node in nodes] == [0, 0], "\n".join(o[-3000:] for o in outputs)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1)]
    assert sorted(r["group_rank"] for r in ranks) == [0, 1] and [r["world"] for r in ranks] == [2, 2]

    data = _scale_worker.dataset
    for rank, record in enumerate(ranks):
        assert record["train_warnings"] == [
            "train_loader has no DistributedSampler: re-created with one (shuffle=True) so that each of the 2 ranks "
            "trains on its own share; set training_params.distributed_sampler: false to use it as given"]
        assert record["kept_when_disabled"] and record["carried"] == ["DistributedSampler", 2, True, True, True]
        for epoch, indices in enumerate(record["train_indices"]):  # seeded by training_params.seed, per epoch
            sampler = torch.utils.data.DistributedSampler(data(10), num_replicas=2, rank=rank, shuffle=True, seed=7)
            sampler.set_epoch(epoch)
            assert indices == list(sampler)[:4]  # drop_last: 2 batches of 2 out of 5
        assert record["worker_args"][:4] == [1, True, 3, True]
        assert "pads the last rank's share" in record["eval_warnings"][0]
        assert record["ddp"] == [True, True, False]  # the user's DDP(find_unused_parameters=True) kept
        assert record["vote"] == (True, True, False, False) and record["vote_async"] == (False, False, True, True)
        assert record["vote_none"] == (False,) * 4 and record["any"] is True
        assert record["uneven"] == ranks[0]["uneven"] and "rank 0: 3, rank 1: 2" in record["uneven"]
        assert record["uneven_seconds"] < 30
        assert record["resume_rank0_reads"] is True and record["no_restart"] is False
        assert "exists on ranks [0] but not on ranks [1]" in record["resume_every_rank_reads"]
    assert ranks[0]["worker_args"][4] == ranks[1]["worker_args"][4]  # seed None: one seed, shared
    first, second = (set(indices) for indices in (ranks[0]["train_indices"][0], ranks[1]["train_indices"][0]))
    assert not first & second

    # validation: disjoint, unpadded shares; metrics and loss equal one process's
    single = _scale_worker.evaluate(_scale_worker.model(), DataLoader(data(9), batch_size=4,
                                                                    collate_fn=_scale_worker.collate))
    for key in ("valid", "valid_padded_replaced"):
        assert sorted(ranks[0][key][2] + ranks[1][key][2]) == list(range(9))
        assert ranks[0][key][0] == ranks[1][key][0] == single[0]
        assert ranks[0][key][1] == pytest.approx(single[1], abs=1e-6)  # batch means are float32
    assert sorted(ranks[0]["valid_padded_as_given"][2] + ranks[1]["valid_padded_as_given"][2]) == [0] + list(range(9))


# ---- in this process ------------------------------------------------------------------------------------------
def test_resume_auto_decides_by_the_agent_restart_count():
    agent = {"TORCHELASTIC_RUN_ID": "job", "TORCHELASTIC_RESTART_COUNT": "0"}
    restarted = dict(agent, TORCHELASTIC_RESTART_COUNT="2")
    assert not resume_decision("auto", True, env=agent).resume
    assert resume_decision("auto", True, env=restarted).resume
    before_first_checkpoint = resume_decision("auto", False, env=restarted)
    assert not before_first_checkpoint.resume and "no rank finds" in before_first_checkpoint.reason
    assert resume_decision(True, False, env=agent).resume
    with pytest.warns(UserWarning, match="restart 2 of torchrun's elastic agent with resume: false"):
        starts_over = resume_decision(False, True, env=restarted)
    assert not starts_over.resume and "training starts over" in starts_over.reason
    with pytest.raises(ValueError, match="true, false or 'auto'"):
        resume_decision("yes", True, env=agent)


def test_resume_defaults_to_auto_under_the_elastic_agent_only(monkeypatch):
    base = {"max_epochs": 1, "initial_lr": 0.1}
    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    assert resolve_training_params(base).resume is False
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job")
    assert resolve_training_params(base).resume == "auto"
    assert resolve_training_params(dict(base, resume=False)).resume is False
    assert resolve_training_params(dict(base, resume="AUTO")).resume == "auto"
    params = resolve_training_params(base)
    assert params.distributed_sampler is True and params.fsdp is False
    assert params.fsdp_params == {"blocks": None, "reshard_after_forward": True, "checkpoint": "full"}
    for bad, match in (({"resume": "yes"}, "resume"), ({"distributed_sampler": 1}, "distributed_sampler"),
                       ({"fsdp": "true"}, "fsdp"), ({"fsdp_params": {"block": []}}, "fsdp_params"),
                       ({"fsdp_params": {"blocks": "Block"}}, "blocks"),
                       ({"fsdp_params": {"checkpoint": "dcp"}}, "fsdp_params.checkpoint")):
        with pytest.raises(ValueError, match=match):
            resolve_training_params(dict(base, **bad))


def test_default_blocks_are_the_roots_children_with_parameters_or_the_named_ones():
    model = nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 1)))
    assert default_blocks(model) == [model[0], model[2]]
    assert default_blocks(model, ["2.*"]) == [model[2][0], model[2][1]]
    assert default_blocks(model, ["Linear"]) == [model[0], model[2][0], model[2][1]]
    with pytest.raises(ValueError, match="no module of the model matches"):
        default_blocks(model, ["TransformerBlock"])
    assert checked_fsdp_params({"blocks": ("Linear",)}) == {"blocks": ["Linear"], "reshard_after_forward": True,
                                                               "checkpoint": "full"}


def test_sharding_helpers_in_one_process():
    loader = DataLoader(TensorDataset(torch.arange(10)), batch_size=3, shuffle=True)
    assert sharding.shard_train_loader(loader) is loader and sharding.shard_eval_loader(loader) is loader
    shares = [list(sharding.UnpaddedDistributedSampler(range(10), num_replicas=3, rank=r)) for r in range(3)]
    assert sorted(sum(shares, [])) == list(range(10)) and [len(s) for s in shares] == [4, 3, 3]
    assert sharding.per_rank_share(10, 3, batch_size=2) == [2, 2, 2]
    assert sharding.per_rank_share(9, 2, batch_size=4) == [2, 1]
    assert sharding.batch_size_of({"pixel_values": torch.zeros(5, 2)}) == 5
    assert sharding.batch_size_of([torch.zeros(4), torch.zeros(4)]) == 4
    mean = sharding.SampleWeightedMean()
    mean.add(torch.tensor(1.0), 4)
    mean.add(torch.tensor(4.0), 1)
    assert mean.average() == [pytest.approx(8 / 5)]
    assert sharding.SampleWeightedMean().average(components=1) == []
    batches = [(0, "a", False), (1, "b", True)]
    assert list(sharding.equalized_batches(iter(batches), [2, 4])) == [
        (0, "a", True), (1, "b", True), (2, "b", False), (3, "b", False)]
    with pytest.raises(ValueError, match=r"ranks \[1\] have no evaluation batch"):  # also on rank 0, which has one
        list(sharding.equalized_batches(iter(batches), [2, 0]))
    sharding.check_same_batch_count(3)  # alone: nothing to compare
    vote = distributed.RankVote(2)
    assert vote.vote(True, False) == (True, False)
    vote.start(False, True)
    assert vote.result() == (False, True)
    with pytest.raises(ValueError, match="size 2 got 1 flags"):
        vote.vote(True)


class _MyLoader(DataLoader):
    pass


class _Stream(IterableDataset):
    def __iter__(self):
        return iter(range(3))


def test_what_cannot_be_sharded_is_said(monkeypatch):
    monkeypatch.setattr(sharding, "is_distributed", lambda: True)
    data = TensorDataset(torch.arange(8))
    weighted = DataLoader(data, batch_size=2, sampler=WeightedRandomSampler([1.0] * 8, 8))
    with pytest.raises(ValueError, match="train_loader: its sampler WeightedRandomSampler cannot be sharded"):
        sharding.shard_train_loader(weighted, "train_loader", seed=0)
    with pytest.raises(ValueError, match="_MyLoader .a DataLoader subclass."):
        sharding.shard_train_loader(_MyLoader(data, batch_size=2), "train_loader", seed=0)
    with pytest.warns(UserWarning, match="train_loader is a list, not a DataLoader"):
        assert sharding.shard_train_loader([1, 2], "train_loader") == [1, 2]
    with pytest.warns(UserWarning, match="reads an IterableDataset"):
        sharding.shard_train_loader(DataLoader(_Stream()), "train_loader")
    with pytest.warns(UserWarning, match="valid_loader is evaluated whole on every rank"):
        sharding.shard_eval_loader(weighted, "valid_loader")
    custom = DataLoader(data, batch_sampler=BatchSampler(RandomSampler(data), 3, drop_last=True))
    assert sharding._plain_order(custom, "train_loader") == (True, 3, True)  # torch's own BatchSampler: rebuilt
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert sharding.shard_train_loader(custom, enabled=False) is custom
