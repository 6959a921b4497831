"""Run by test_resume.py in a fresh process: train fully, train and get killed, or resume."""
import argparse
import os
import signal
import time

import torch
import torch.nn as nn
from torch.utils.data import DataLoader

from conftest import make_data
from super_trainer import Callback, Trainer
from super_trainer.checkpoint import wait_for_writes


class InputJitter(Callback):
    """Stateful: scales inputs by a factor that depends on how many batches it has seen."""

    def __init__(self):
        self.count = 0

    def on_train_batch_start(self, context):
        context.inputs = context.inputs * (1.0 + 0.01 * (self.count % 5))
        self.count += 1

    def state_dict(self):
        return {"count": self.count}

    def load_state_dict(self, state):
        self.count = state["count"]


class KillAtEpoch(Callback):
    """A hard crash (no cleanup, no on_training_end) when epoch ``epoch`` starts."""

    def __init__(self, epoch):
        self.epoch = epoch

    def on_train_loader_start(self, context):
        if context.epoch == self.epoch:
            # Checkpoints are written by a background thread; let the one in flight land first, so the
            # kill comes after epoch ``epoch`` was saved (a kill during the write keeps the previous file).
            wait_for_writes()
            os._exit(17)


class KillAtBatch(Callback):
    """A hard crash when the run's ``batches_seen``-th train batch (0-based, over all epochs) starts."""

    def __init__(self, batch):
        self.batch = batch

    def on_train_batch_start(self, context):
        if context.batches_seen == self.batch:
            wait_for_writes()  # the mid-epoch checkpoint taken before this batch is on disk (see KillAtEpoch)
            os._exit(17)


class CtrlCAtBatch(Callback):
    """A real SIGINT (as Ctrl-C sends) while the ``batches_seen``-th train batch runs."""

    def __init__(self, batch):
        self.batch = batch

    def on_train_batch_start(self, context):
        if context.batches_seen == self.batch:
            os.kill(os.getpid(), signal.SIGINT)


class SigtermAtBatch(Callback):
    """A SIGTERM while the ``batches_seen``-th train batch runs: sent by the process itself (``marker`` None), or
    by the test from outside once ``marker`` exists (the batch waits until the trainer's handler has it)."""

    def __init__(self, batch, marker=None):
        self.batch, self.marker = batch, marker

    def on_train_batch_start(self, context):
        if context.batches_seen != self.batch:
            return
        if self.marker is None:
            os.kill(os.getpid(), signal.SIGTERM)
            return
        with open(self.marker, "w") as f:
            f.write(str(os.getpid()))
        handler = signal.getsignal(signal.SIGTERM).__self__  # the trainer's DeferredInterrupt
        deadline = time.monotonic() + 120
        while not handler.requested and time.monotonic() < deadline:
            time.sleep(0.01)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--mode", choices=["full", "killed", "resume"], required=True)
    parser.add_argument("--root", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--amp", action="store_true")
    parser.add_argument("--ema", action="store_true")
    parser.add_argument("--every", type=int, default=None, help="save_ckpt_every_n_steps")
    parser.add_argument("--kill-batch", type=int, default=None, help="os._exit when this train batch starts")
    parser.add_argument("--sigint-batch", type=int, default=None, help="SIGINT while this train batch runs")
    parser.add_argument("--sigterm-batch", type=int, default=None, help="SIGTERM while this train batch runs")
    parser.add_argument("--marker", default=None, help="with --sigterm-batch: the test sends it, once this exists")
    args = parser.parse_args()

    torch.manual_seed(1234)  # a different init than the trainer's seed, like any user model
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Dropout(0.2), nn.Linear(32, 3))
    loader = DataLoader(make_data(96, seed=2), batch_size=16, shuffle=True)
    valid = DataLoader(make_data(32, seed=9), batch_size=16)
    callbacks = [InputJitter()]
    if args.mode == "killed" and args.kill_batch is not None:
        callbacks.append(KillAtBatch(args.kill_batch))
    elif args.mode == "killed" and args.sigint_batch is not None:
        callbacks.append(CtrlCAtBatch(args.sigint_batch))
    elif args.mode == "killed" and args.sigterm_batch is not None:
        callbacks.append(SigtermAtBatch(args.sigterm_batch, args.marker))
    elif args.mode == "killed":
        callbacks.append(KillAtEpoch(2))
    params = {
        "max_epochs": 4, "initial_lr": 0.05, "optimizer": "SGD", "optimizer_params": {"momentum": 0.9},
        "lr_mode": "cosine", "lr_warmup_epochs": 1, "batch_accumulate": 2, "mixed_precision": args.amp,
        "ema": args.ema, "ema_params": {"decay": 0.9, "decay_type": "threshold"},
        "phase_callbacks": callbacks, "resume": args.mode == "resume", "sg_logger": "base", "progress_bar": False,
        "save_ckpt_every_n_steps": args.every, "train_metrics_list": ["Accuracy"],
    }
    result = Trainer("exp", args.root, device="cpu").train(model=model, training_params=params, train_loader=loader,
                                                           valid_loader=valid)
    torch.save({"net": model.state_dict(), "epochs": [h["epoch"] for h in result.history],
                "train_losses": [h["train/CrossEntropyLoss"] for h in result.history],
                "history": [{k: v for k, v in h.items() if k != "seconds"} for h in result.history],
                "count": callbacks[0].count, "best_metric": result.best_metric, "stop_reason": result.stop_reason},
               args.out)


if __name__ == "__main__":
    main()
