"""Run by test_scale.py under ``torchrun --standalone --nproc_per_node=2 --max-restarts=1`` (gloo, CPU).

A hand-written loop trains an FSDP2 model with super_trainer's helpers (fsdp.py, ema_sharded.py, elastic.py,
sharding.py) the way the trainer's loop will call them. Attempt 0 trains 4 steps, writing a full checkpoint
after step 2, records the result, then rank 1 dies; torchrun's agent restarts both ranks, attempt 1 decides
``resume: auto`` by itself, loads the checkpoint (read on rank 0 only) and trains steps 3-4 again. The test
compares both attempts with one plain process (``reference`` below, run in the test itself).
"""
import argparse
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from super_trainer import distributed, sharding
from super_trainer.ema import ModelEMA
from super_trainer.ema_sharded import make_ema
from super_trainer.elastic import resume_decision
from super_trainer.fsdp import (check_parallel_wrapping, clip_grad_norm, full_state_dicts, load_full_state_dicts,
                                load_sharded_checkpoint, save_sharded_checkpoint, shard_model)
from super_trainer.metrics import Accuracy

STEPS, CHECKPOINT_AFTER, GLOBAL_BATCH, MAX_NORM = 4, 2, 8, 0.5
EMA = {"decay": 0.9, "decay_type": "threshold"}


def make_model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 7), nn.ReLU(), nn.Linear(7, 5), nn.ReLU(), nn.Linear(5, 3))


def batches():
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(GLOBAL_BATCH, 6, generator=g), torch.randint(0, 3, (GLOBAL_BATCH,), generator=g))
            for _ in range(STEPS)]


def eval_data(n=9):
    g = torch.Generator().manual_seed(2)
    return torch.utils.data.TensorDataset(torch.randn(n, 6, generator=g), torch.randint(0, 3, (n,), generator=g))


def optimizer_for(model):
    return torch.optim.AdamW(model.parameters(), lr=0.05, weight_decay=0.01)


def train(model, optimizer, ema, steps, share=lambda t: t, clip=clip_grad_norm):
    """The loop body the trainer runs, on this rank's share of each global batch; returns the grad norms."""
    norms = []
    data = batches()
    for step in steps:
        x, y = (share(t) for t in data[step])
        F.cross_entropy(model(x), y).backward()
        norms.append(float(clip(model.parameters(), MAX_NORM)))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        ema.step(model, step + 1, STEPS)
    return norms


def evaluate(model, loader, forward_everywhere=False):
    """Accuracy (torchmetrics, synced) and the sample-weighted loss over every rank's unpadded share."""
    metric, loss = Accuracy(), sharding.SampleWeightedMean()
    numbered = ((i, b, True) for i, b in enumerate(loader))
    if forward_everywhere:  # FSDP: every rank runs as many forwards, the extra ones counted nowhere
        numbered = sharding.equalized_batches(numbered, sharding.gather_counts(len(loader)))
    with torch.no_grad():
        for _, (x, y), counted in numbered:
            out = model(x)
            if counted:
                metric.update(out, y)
                loss.add(F.cross_entropy(out, y), sharding.batch_size_of(x))
    return float(metric.compute()), loss.average(components=1)[0]


def reference():
    """One process, the plain model, the whole global batch: what the 2 ranks must equal."""
    model = make_model()
    optimizer, ema = optimizer_for(model), ModelEMA(model, **EMA)
    norms = train(model, optimizer, ema, range(STEPS), clip=torch.nn.utils.clip_grad_norm_)
    loader = torch.utils.data.DataLoader(eval_data(), batch_size=4)
    return {"net": model.state_dict(), "ema": ema.state_dict(), "norms": norms, "valid": evaluate(model, loader)}


def wrapping_errors():
    """FSDP1 and a partly sharded model are refused with one clear message each."""
    from torch.distributed.fsdp import FullyShardedDataParallel, fully_shard

    messages = []
    for model in (FullyShardedDataParallel(nn.Linear(2, 2), device_id=torch.device("cpu")),
                  nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))):
        if not isinstance(model, FullyShardedDataParallel):
            fully_shard(model[0])
        try:
            check_parallel_wrapping(model)
        except ValueError as err:
            messages.append(str(err))
    return messages


def read_sharded(directory):
    """A fresh sharded model, optimizer and EMA loaded from the sharded checkpoint, gathered for comparison."""
    model = shard_model(make_model(seed=77), torch.device("cpu"))
    optimizer, ema = optimizer_for(model), make_ema(model, **EMA)
    extra = {"ema": ema.sharded_state_dict(), "step": 0}
    load_sharded_checkpoint(directory, model, optimizer, extra)
    net, optim = full_state_dicts(model, optimizer)
    return {"net": net, "optim": optim, "ema": ema.state_dict(), "step": extra["step"]}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    out = Path(parser.parse_args().out)
    distributed.init_from_env(torch.device("cpu"))
    rank, ckpt = distributed.rank(), out / "ckpt.pth"
    half = GLOBAL_BATCH // 2
    share = lambda t: t[rank * half:(rank + 1) * half]  # noqa: E731  (rank r's half of every global batch)

    attempt = int(os.environ["TORCHELASTIC_RESTART_COUNT"])
    model = shard_model(make_model(seed=0 if attempt == 0 else 123), torch.device("cpu"))
    optimizer, ema = optimizer_for(model), make_ema(model, **EMA)
    # rank 1 never sees the file: only rank 0 reads it (as on nodes without a shared filesystem)
    decision = resume_decision("auto", ckpt.exists() and rank == 0, str(ckpt), only_rank0_reads=True)
    first = 0
    if decision.resume:
        state = torch.load(ckpt, weights_only=True) if rank == 0 else {}
        load_full_state_dicts(model, optimizer, state.get("net"), state.get("optimizer_state_dict"))
        ema.load_state_dict(state.get("ema_net", {}))
        first = CHECKPOINT_AFTER
    norms = train(model, optimizer, ema, range(first, CHECKPOINT_AFTER), share)
    if not decision.resume:  # the checkpoint of step 2: full state dicts, every rank gathering
        net, optim = full_state_dicts(model, optimizer)
        ema_net = ema.state_dict()
        if rank == 0:
            torch.save({"net": net, "optimizer_state_dict": optim, "ema_net": ema_net}, out / "ckpt.tmp")
            os.replace(out / "ckpt.tmp", ckpt)
        # the option for models too big to gather: every rank writes its own shards
        save_sharded_checkpoint(out / "sharded", model, optimizer, {"ema": ema.sharded_state_dict(), "step": 2})
    norms += train(model, optimizer, ema, range(CHECKPOINT_AFTER, STEPS), share)
    net, optim = full_state_dicts(model, optimizer)
    ema_net = ema.state_dict()
    loader = sharding.shard_eval_loader(torch.utils.data.DataLoader(eval_data(), batch_size=4))
    valid = evaluate(model, loader, forward_everywhere=True)
    with ema.evaluation_model(model) as ema_model:
        ema_valid = evaluate(ema_model, loader, forward_everywhere=True)
    restored, _ = full_state_dicts(model)  # the trained weights are back after the EMA evaluation
    sharded = read_sharded(out / "sharded") if attempt == 1 else {}
    if rank == 0:
        torch.save({"net": net, "optim": optim, "ema": ema_net, "norms": norms, "valid": valid, "ema_valid": ema_valid,
                    "restored": restored, "decision": decision.reason, "shares": len(loader), "sharded": sharded,
                    "errors": wrapping_errors() if attempt == 0 else []}, out / f"attempt{attempt}.pt")
    else:
        torch.save({"shares": len(loader), "decision": decision.reason}, out / f"attempt{attempt}_rank1.pt")
    dist.barrier()
    if attempt == 0 and rank == 1:
        sys.stdout.flush()
        os._exit(1)  # a worker dies: torchrun (--max-restarts=1) restarts every rank


if __name__ == "__main__":
    main()
