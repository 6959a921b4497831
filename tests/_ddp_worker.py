"""Run under torchrun by test_distributed.py (or alone for the single-process reference)."""
import argparse
import os
import signal
import time

import torch

from conftest import make_loader, make_model, quiet_params
from super_trainer import Callback, Trainer
from super_trainer import distributed


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


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--root", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--stop", action="store_true")
    parser.add_argument("--accumulate", type=int, default=1)
    parser.add_argument("--sigterm-marker", default=None)
    args = parser.parse_args()
    model = make_model()
    counter = CountAllReduces()
    callbacks = [counter] + ([StopOnRank1()] if args.stop else [])
    if args.sigterm_marker:
        callbacks.append(WaitForSigterm(args.sigterm_marker))
    result = Trainer("ddp", args.root, device="cpu").train(
        model=model, training_params=quiet_params(max_epochs=3, optimizer_params={"momentum": 0.9}, phase_callbacks=callbacks,
                                                  batch_accumulate=args.accumulate),
        train_loader=make_loader(32, 8, shuffle=True), valid_loader=make_loader(16, 8))
    rank = distributed.rank()
    torch.save({"net": model.state_dict(), "stop_reason": result.stop_reason, "world": distributed.world_size(),
                "epochs": [h["epoch"] for h in result.history], "metrics": result.metrics,
                "all_reduces": counter.calls, "ckpt_dir": str(result.ckpt_dir)},
               os.path.join(args.out, f"rank{rank}.pt"))


if __name__ == "__main__":
    main()
