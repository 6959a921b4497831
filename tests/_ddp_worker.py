"""Run under torchrun by test_distributed.py (or alone for the single-process reference).

Ranks are given the user's plain loaders (no DistributedSampler): the trainer shards them. ``--batch 8`` on each
of 2 ranks reads the same samples per step as ``--batch 16`` in one process.
"""
import argparse
import os
import shutil
import signal
import time
import warnings

import torch

from conftest import make_loader, make_model, quiet_params
from super_trainer import Callback, Trainer
from super_trainer import distributed
from super_trainer.checkpoint import CheckpointError
from super_trainer.loop import resume as resume_module


class StopOnRank1(Callback):
    """Requests a mid-epoch stop on rank 1 only: every rank must still stop at the same batch."""

    def on_train_batch_loss_end(self, context):
        if context.epoch == 1 and context.batch_idx == 1 and distributed.rank() == 1:
            context.stop_training = True


class CountAllReduces(Callback):
    """Counts DDP's gradient all-reduces through a communication hook that then does the default all-reduce."""

    def __init__(self):
        self.calls = 0

    def on_training_start(self, context):
        if isinstance(context.net, torch.nn.parallel.DistributedDataParallel):
            from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

            def counting(state, bucket):
                self.calls += 1
                return allreduce_hook(state, bucket)

            context.net.register_comm_hook(None, counting)


class RecordShares(Callback):
    """The sample indices this rank trains on in epoch 0 and evaluates on."""

    def __init__(self):
        self.train, self.valid = None, None

    def on_train_loader_start(self, context):
        if context.epoch == 0:
            self.train = list(context.train_loader.sampler)
            self.valid = list(context.valid_loader.sampler)


class WaitForSigterm(Callback):
    """Rank 0 writes ``marker`` when train batch (1, 1) starts and waits there until its SIGTERM arrived (the test
    sends it to torchrun, which forwards it to every rank); the other rank waits at the batch's all-reduce."""

    def __init__(self, marker):
        self.marker = marker

    def on_train_batch_start(self, context):
        if (context.epoch, context.batch_idx) != (1, 1) or distributed.rank() != 0:
            return
        with open(self.marker, "w") as f:
            f.write("ready")
        handler = signal.getsignal(signal.SIGTERM).__self__  # the trainer's DeferredInterrupt
        deadline = time.monotonic() + 120
        while not handler.requested and time.monotonic() < deadline:
            time.sleep(0.01)


class CtrlCOnRank1(Callback):
    """Ctrl-C on rank 1 only, after train batch (1, 2): the middle of an accumulation window of 2."""

    def on_train_batch_end(self, context):
        if (context.epoch, context.batch_idx) == (1, 2) and distributed.rank() == 1:
            os.kill(os.getpid(), signal.SIGINT)


class DieOnRank1(Callback):
    """Rank 1 dies (as a lost node would) at train batch (1, 2) of the first attempt, once rank 0's checkpoint
    of the step before had time to land; torchrun's agent then restarts every rank."""

    def on_train_batch_start(self, context):
        first_attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"
        if first_attempt and (context.epoch, context.batch_idx) == (1, 2) and distributed.rank() == 1:
            time.sleep(3)
            os._exit(17)


def train(args, model, callbacks, **params):
    return Trainer("ddp", args.root, device="cpu").train(
        model=model, training_params=quiet_params(
            max_epochs=3, optimizer_params={"momentum": 0.9}, phase_callbacks=callbacks,
            batch_accumulate=args.accumulate, **params),
        train_loader=make_loader(64, args.batch), valid_loader=make_loader(17, 4))


RANK = int(os.environ.get("RANK", "0"))  # before the Trainer joins the process group


def errors(args):
    """The mistakes that must fail on every rank with one clear error, not a gloo abort or a hang."""
    out = {}
    start = time.monotonic()
    try:  # the user's own per-rank loaders (distributed_sampler: false) of different lengths
        Trainer("uneven", args.root, device="cpu").train(
            model=make_model(), training_params=quiet_params(distributed_sampler=False),
            train_loader=make_loader(24 if RANK == 0 else 16, 8))
    except ValueError as err:
        out["uneven"] = str(err)
    out["uneven_seconds"] = time.monotonic() - start
    # one validation sample for two ranks: rank 1's share is empty, and it still joins the loss and metric sums
    out["one_sample"] = Trainer("one_sample", args.root, device="cpu").train(
        model=make_model(), training_params=quiet_params(max_epochs=1), train_loader=make_loader(64, 8),
        valid_loader=make_loader(1, 4)).metrics
    first = Trainer("mismatch", args.root, device="cpu").train(
        model=make_model(), training_params=quiet_params(max_epochs=1), train_loader=make_loader(64, 8))
    stale = os.path.join(args.root, "stale_copy.pth")
    if RANK == 0:
        shutil.copy(os.path.join(first.ckpt_dir, "ckpt_latest.pth"), stale)
    Trainer("mismatch", args.root, device="cpu").train(
        model=make_model(), training_params=quiet_params(max_epochs=2, resume=True), train_loader=make_loader(64, 8))
    if RANK == 1:  # this rank's node has an older copy of the run dir: it reads the epoch-1 checkpoint
        real = resume_module.read_checkpoint
        resume_module.read_checkpoint = lambda path, **kw: real(stale, **kw)
    try:
        Trainer("mismatch", args.root, device="cpu").train(
            model=make_model(), training_params=quiet_params(max_epochs=3, resume=True), train_loader=make_loader(64, 8))
    except CheckpointError as err:
        out["mismatch"] = str(err)
    return out


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--root", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--stop", action="store_true")
    parser.add_argument("--accumulate", type=int, default=1)
    parser.add_argument("--sigterm-marker", default=None)
    parser.add_argument("--ctrl-c", action="store_true")
    parser.add_argument("--die", action="store_true")
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--errors", action="store_true")
    args = parser.parse_args()
    if args.errors:
        torch.save(errors(args), os.path.join(args.out, f"rank{RANK}.pt"))
        return
    counter, shares = CountAllReduces(), RecordShares()
    callbacks = [counter, shares] + ([StopOnRank1()] if args.stop else [])
    if args.sigterm_marker:
        callbacks.append(WaitForSigterm(args.sigterm_marker))
    if args.ctrl_c:
        callbacks.append(CtrlCOnRank1())
    if args.die:
        callbacks.append(DieOnRank1())
    extra = {"save_ckpt_every_n_steps": 1} if args.die else {"resume": True} if args.resume else {}
    model = make_model()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = train(args, model, callbacks, **extra)
    torch.save({"net": model.state_dict(),
                "stop_reason": result.stop_reason, "world": distributed.world_size(),
                "epochs": [h["epoch"] for h in result.history], "metrics": result.metrics,
                "all_reduces": counter.calls, "ckpt_dir": str(result.ckpt_dir),
                "train_share": shares.train, "valid_share": shares.valid,
                "warnings": [str(w.message) for w in caught]},
               os.path.join(args.out, f"rank{RANK}.pt"))


if __name__ == "__main__":
    main()
