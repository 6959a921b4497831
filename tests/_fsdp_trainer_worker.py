"""Run by test_fsdp_trainer.py: FSDP2 through ``Trainer.train`` (SPEC §8 "Scale").

Under ``torchrun --standalone --nproc-per-node=2`` (gloo, CPU), in one launch:

- ``fsdp: true`` with EMA and clip_grad_norm, AdamW, 2 epochs ("a"), then the same run resumed to 3 epochs, and
  an uninterrupted 3-epoch run ("b"); rank r trains on its half of every global batch of 8, so the averaged
  gradient is the single-process one; each rank validates on its own unpadded share (rank 0: 2 batches, rank 1: 1),
  so evaluation runs the extra, uncounted forward;
- ``batch_accumulate: 2`` uninterrupted ("c"), and cut by Ctrl-C on rank 0 inside an accumulation window ("d",
  the checkpoint then holds the window's gathered gradients), then resumed: equal to "c";
- ``torch_compile`` (dynamo's eager backend) around the sharded model ("e");
- the same model sharded by the user with ``fully_shard`` and given as it is ("given");
- a user's ``DistributedDataParallel(find_unused_parameters=True)`` (kept), an FSDP1 model, ``fsdp`` with a
  ``train_step`` and with ``average_best_models``, a resume into a model of other shapes (refused).

Without torchrun (``--single``) it trains runs "a" to "d" (without the resumes) in one process on the whole
global batches: the reference. Each process saves what it saw into ``<out>/rank<r>.pt``.
"""
import argparse
import os
import signal
import time
import warnings

import torch
import torch.nn as nn
from torch.utils.data import DataLoader, Subset, TensorDataset

from super_trainer import Callback, CheckpointError, Trainer, distributed, sharding
from super_trainer.callbacks.grad_norm import GradientNormLogger
from super_trainer.fsdp import full_state_dicts

GLOBAL_BATCH, N_TRAIN, N_VALID = 8, 32, 9


def make_model(seed=0):
    torch.manual_seed(seed)  # 16 and 3 rows: the second Linear shards unevenly over 2 ranks
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))


def data(n, seed):
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(n, 8, generator=g), torch.randint(0, 3, (n,), generator=g))


def train_loader():
    """One process: the global batches. Rank r of 2: the r-th half of each global batch."""
    dataset = data(N_TRAIN, 1)
    world, rank = distributed.world_size(), distributed.rank()
    if world == 1:
        return DataLoader(dataset, batch_size=GLOBAL_BATCH)
    half = GLOBAL_BATCH // world
    rows = [i for start in range(0, N_TRAIN, GLOBAL_BATCH)
            for i in range(start + rank * half, start + (rank + 1) * half)]
    return DataLoader(Subset(dataset, rows), batch_size=half)


def valid_loader():
    return sharding.shard_eval_loader(DataLoader(data(N_VALID, 2), batch_size=4))  # as is on one process


def params(**overrides):
    base = {"max_epochs": 2, "initial_lr": 0.05, "optimizer": "AdamW", "optimizer_params": {"weight_decay": 0.01},
            "loss": "CrossEntropyLoss", "valid_metrics_list": ["Accuracy"], "metric_to_watch": "Accuracy",
            "sg_logger": "base", "progress_bar": False, "silent_mode": True, "fsdp": True, "ema": True,
            "ema_params": {"decay": 0.9, "decay_type": "threshold"}, "clip_grad_norm": 0.5,
            "distributed_sampler": False, "seed": 0}
    base.update(overrides)
    return base


class Seen(Callback):
    """What the trainer trains: the forward module's type, and (DDP) its find_unused_parameters."""

    def __init__(self):
        self.net_type, self.find_unused, self.valid_batches = None, None, 0

    def on_training_start(self, context):
        self.net_type = type(context.net).__name__
        self.find_unused = getattr(context.net, "find_unused_parameters", None)

    def on_validation_batch_end(self, context):
        self.valid_batches += 1


class CtrlCOnRank0(Callback):
    """Ctrl-C on rank 0 during train batch (0, 2): the first micro-batch of an accumulation window of 2."""

    def on_train_batch_loss_end(self, context):
        if (context.epoch, context.batch_idx) == (0, 2) and distributed.rank() == 0:
            os.kill(os.getpid(), signal.SIGINT)


def full(model):
    """The trained model's full state_dict (every rank calls: it gathers a sharded one); None off rank 0."""
    from super_trainer.fsdp import is_fsdp2

    if is_fsdp2(model):
        return full_state_dicts(model)[0]
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def run(root, name, model=None, callbacks=(), **overrides):
    seen, norms = Seen(), GradientNormLogger(log_interval=1)
    model = make_model() if model is None else model
    result = Trainer(name, root, device="cpu").train(
        model=model, training_params=params(phase_callbacks=[seen, norms, *callbacks], **overrides),
        train_loader=train_loader(), valid_loader=valid_loader())
    tested = Trainer(name, root, device="cpu").test(model, valid_loader())  # uneven shares: equalized forwards
    return {"net": full(model), "metrics": result.metrics, "ckpt_dir": str(result.ckpt_dir), "test": tested,
            "net_type": seen.net_type, "valid_batches": seen.valid_batches, "last_norm": norms.last_norm,
            "stop_reason": result.stop_reason}


def interrupted(root):
    """Run "d" cut by Ctrl-C, and the gradients its checkpoint holds (rank 0)."""
    seen = run(root, "d", callbacks=[CtrlCOnRank0()], batch_accumulate=2)
    if distributed.rank() == 0:
        latest = torch.load(os.path.join(seen["ckpt_dir"], "ckpt_latest.pth"), weights_only=True)
        seen["progress"] = {"batches": latest["epoch_progress"]["batches"], "grads": latest["epoch_progress"]["grads"]}
    return seen


class DieOnRank1(Callback):
    """Rank 1 dies (a lost node) at train batch (1, 2) of the first attempt, once rank 0's checkpoint of the step
    before had time to land; torchrun's agent then restarts both ranks."""

    def on_train_batch_start(self, context):
        first_attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"
        if first_attempt and (context.epoch, context.batch_idx) == (1, 2) and distributed.rank() == 1:
            time.sleep(3)
            os._exit(17)


def killed_and_restarted(root):
    """Run "k" (accumulation 2, a checkpoint every step) killed on rank 1 and restarted by torchrun: resume: auto
    continues it; then the same run uninterrupted ("k_whole"), for comparison."""
    restarted = run(root, "k", callbacks=[DieOnRank1()], batch_accumulate=2, save_ckpt_every_n_steps=1)
    restarted["restart_count"] = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    return {"k": restarted, "k_whole": run(root, "k_whole", batch_accumulate=2, save_ckpt_every_n_steps=1)}


def refused(root, name, model, **overrides):
    """The ValueError's (or CheckpointError's) message of a run that must not start."""
    try:
        run(root, name, model, **overrides)
    except (ValueError, CheckpointError) as err:
        return str(err)
    return None


def user_ddp(root):
    """A DDP the user made with find_unused_parameters=True, over a model with a layer forward never calls:
    DDP with the defaults fails at the second step; the trainer keeps the user's wrapper."""
    class WithUnused(nn.Module):
        def __init__(self):
            super().__init__()
            self.body, self.unused = make_model(), nn.Linear(2, 2)

        def forward(self, x):
            return self.body(x)

    seen = Seen()
    ddp = nn.parallel.DistributedDataParallel(WithUnused(), find_unused_parameters=True)
    Trainer("ddp_unused", root, device="cpu").train(
        model=ddp, training_params=params(fsdp=False, ema=False, phase_callbacks=[seen]),
        train_loader=train_loader(), valid_loader=valid_loader())
    return {"net_type": seen.net_type, "find_unused": seen.find_unused}


def ddp_with_train_step(root):
    """A user's DDP with a train_step: the trainer averages the gradients itself, and says the wrapper is unused."""
    def step(context):
        return nn.functional.cross_entropy(context.net(context.inputs), context.target)

    ddp = nn.parallel.DistributedDataParallel(make_model(), find_unused_parameters=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run(root, "ddp_step", ddp, fsdp=False, ema=False, train_step=step)
    return [str(w.message) for w in caught if "DistributedDataParallel" in str(w.message)]


def given_fsdp2(root):
    """The user shards the model as fsdp: true would and passes it with fsdp: false: trained as it is."""
    from torch.distributed.fsdp import fully_shard

    model = make_model()
    for block in (model[0], model[2]):
        fully_shard(block)
    fully_shard(model)
    return run(root, "given", model, fsdp=False)


def fsdp1_model():
    from torch.distributed.fsdp import FullyShardedDataParallel

    return FullyShardedDataParallel(make_model(), device_id=torch.device("cpu"))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--root", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--single", action="store_true")
    parser.add_argument("--die", action="store_true")
    args = parser.parse_args()
    root = args.root
    if not args.single:
        distributed.init_from_env(torch.device("cpu"))
    if args.die:
        torch.save(killed_and_restarted(root), os.path.join(args.out, f"rank{distributed.rank()}.pt"))
        return
    seen = {"world": distributed.world_size(), "a": run(root, "a"), "b": run(root, "b", max_epochs=3),
            "c": run(root, "c", batch_accumulate=2), "d": interrupted(root)}
    if not args.single:
        seen["resumed"] = run(root, "a", make_model(seed=7), max_epochs=3, resume=True)  # weights from the checkpoint
        seen["d_resumed"] = run(root, "d", make_model(seed=7), batch_accumulate=2, resume=True)
        sharded = {"checkpoint": "sharded"}  # torch.distributed.checkpoint shards instead of gathered state dicts
        seen["s"] = run(root, "s", fsdp_params=sharded)
        seen["s_resumed"] = run(root, "s", make_model(seed=7), max_epochs=3, resume=True, fsdp_params=sharded)
        seen["given"] = given_fsdp2(root)
        # torch_compile wraps the sharded module (dynamo's eager backend: the wrapper path without a C++ compiler)
        seen["compiled"] = run(root, "e", torch_compile=True, torch_compile_options={"backend": "eager"})
        seen["ddp"] = user_ddp(root)
        seen["ddp_step"] = ddp_with_train_step(root)
        seen["errors"] = {
            "fsdp1": refused(root, "fsdp1", fsdp1_model()),
            "train_step": refused(root, "step", None, train_step=lambda context: context.net(context.inputs).sum()),
            "average": refused(root, "average", None, average_best_models=True),
            # run "a"'s checkpoint into a wider model: refused on every rank alike, before any collective
            "misfit": refused(root, "a", nn.Sequential(nn.Linear(8, 17), nn.ReLU(), nn.Linear(17, 3)), max_epochs=4,
                              resume=True),
        }
    torch.save(seen, os.path.join(args.out, f"rank{distributed.rank()}.pt"))


if __name__ == "__main__":
    main()
