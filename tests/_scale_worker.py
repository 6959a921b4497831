"""Run by test_scale.py on "two nodes" of one process each (two torchrun invocations, c10d rendezvous, gloo):
data sharding, evaluation without padded duplicates, the batch-count check, the user's DDP kept, the packed
stop vote and the cross-rank ``resume: auto`` decision. Each rank writes what it saw to ``<out>/rank<r>.pt``;
the test compares the ranks with each other and with one process."""
import argparse
import time
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from super_trainer import distributed, sharding
from super_trainer.elastic import resume_decision
from super_trainer.metrics import Accuracy
from super_trainer.parallel import check_given_model, data_parallel_model


def dataset(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.arange(n), torch.randn(n, 4, generator=g), torch.randint(0, 3, (n,), generator=g))


def collate(samples):  # a user's own collate_fn: must survive the re-creation
    index, x, y = zip(*samples)
    return torch.stack(index), torch.stack(x), torch.stack(y)


def model():
    torch.manual_seed(0)
    return nn.Linear(4, 3)


def evaluate(net, loader):
    """Accuracy (torchmetrics, synced across ranks) and the sample-weighted loss, as validation does."""
    metric, loss, seen = Accuracy(), sharding.SampleWeightedMean(), []
    with torch.no_grad():
        for index, x, y in loader:
            out = net(x)
            metric.update(out, y)
            loss.add(F.cross_entropy(out, y), sharding.batch_size_of(x))
            seen += index.tolist()
    return float(metric.compute()), loss.average()[0], seen


def train_sharding(record):
    given = DataLoader(dataset(10), batch_size=2, shuffle=True, collate_fn=collate, drop_last=True,
                       generator=torch.Generator().manual_seed(3))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loader = sharding.shard_train_loader(given, "train_loader", seed=7)
        kept = sharding.shard_train_loader(given, "train_loader", seed=7, enabled=False)
    record["train_warnings"] = [str(w.message) for w in caught]
    record["kept_when_disabled"] = kept is given
    record["carried"] = [type(loader.sampler).__name__, loader.batch_size, loader.drop_last,
                         loader.collate_fn is collate, loader.generator is given.generator]
    epochs = []
    for epoch in (0, 1):
        sharding.set_sampler_epoch(loader, epoch)
        epochs.append([i for index, _, _ in loader for i in index.tolist()])
    record["train_indices"] = epochs
    workers = DataLoader(dataset(10), batch_size=2, num_workers=1, persistent_workers=True, prefetch_factor=3,
                         pin_memory=False, worker_init_fn=print)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        redone = sharding.shard_train_loader(workers, "workers_loader", seed=None)
    record["worker_args"] = [redone.num_workers, redone.persistent_workers, redone.prefetch_factor,
                             redone.worker_init_fn is print, redone.sampler.seed]


def eval_sharding(record):
    net = model()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        plain = sharding.shard_eval_loader(DataLoader(dataset(9), batch_size=4, collate_fn=collate), "valid_loader")
        padded_given = DataLoader(dataset(9), batch_size=4, collate_fn=collate, sampler=DistributedSampler(
            dataset(9), shuffle=False))
        padded = sharding.shard_eval_loader(padded_given, "valid_loader")
    record["eval_warnings"] = [str(w.message) for w in caught]
    record["valid"] = evaluate(net, plain)
    record["valid_padded_replaced"] = evaluate(net, padded)
    record["valid_padded_as_given"] = evaluate(net, padded_given)


def uneven_batches(record):
    """Rank 0 would run 3 batches, rank 1 two: both must fail before any collective of the epoch, alike."""
    started = time.monotonic()
    try:
        sharding.check_same_batch_count(3 if distributed.rank() == 0 else 2, "train_loader")
        record["uneven"] = None
    except ValueError as err:
        record["uneven"] = str(err)
    record["uneven_seconds"] = time.monotonic() - started
    sharding.check_same_batch_count(5, "train_loader")  # equal counts pass


def users_ddp(record):
    net = model()
    given = DistributedDataParallel(net, find_unused_parameters=True)
    check_given_model(given, torch.device("cpu"))
    kept = data_parallel_model(given, net, torch.device("cpu"), distributed=True)
    other = model()
    made = data_parallel_model(other, other, torch.device("cpu"), distributed=True)
    record["ddp"] = [kept is given, kept.find_unused_parameters, made.find_unused_parameters]


def votes(record):
    vote = distributed.RankVote(4)
    mine = (True, False, False, False) if distributed.rank() == 0 else (False, True, False, False)
    record["vote"] = vote.vote(*mine)
    vote.start(*reversed(mine))
    record["vote_async"] = vote.result()
    record["vote_none"] = vote.vote(False, False, False, False)
    record["any"] = distributed.any_rank_true(distributed.rank() == 1)


def auto_resume(record):
    """Only rank 1's agent counts a restart (a healthy node's agent does not): every rank must still resume."""
    env = {"TORCHELASTIC_RUN_ID": "t", "TORCHELASTIC_RESTART_COUNT": "1" if distributed.rank() == 1 else "0"}
    on_rank0_only = distributed.rank() == 0
    record["resume_rank0_reads"] = resume_decision("auto", on_rank0_only, only_rank0_reads=True, env=env).resume
    try:
        resume_decision("auto", on_rank0_only, env=env)
        record["resume_every_rank_reads"] = None
    except ValueError as err:
        record["resume_every_rank_reads"] = str(err)
    record["no_restart"] = resume_decision("auto", True, env={"TORCHELASTIC_RUN_ID": "t"}).resume


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    out = Path(parser.parse_args().out)
    distributed.init_from_env(torch.device("cpu"))
    record = {"world": distributed.world_size(), "group_rank": int(__import__("os").environ["GROUP_RANK"])}
    for check in (train_sharding, eval_sharding, uneven_batches, users_ddp, votes, auto_resume):
        check(record)
    torch.save(record, out / f"rank{distributed.rank()}.pt")
    dist.barrier()


if __name__ == "__main__":
    main()
