"""Run under torchrun by test_any_loop_distributed.py (or alone for the single-process reference): the shapes of
SPEC §8 under DDP, each rank seeing the same batches, so every rank must end with the single process's weights."""
import argparse
import os

import torch

from _any_models import GAN, GAN_OPTIMIZERS, TinyTextClassifier, contrastive_step, gan_step, real_batches, text_batches
from conftest import make_loader, make_model, quiet_params
from super_trainer import Trainer, distributed
from super_trainer.loop import optimizers as loop_optimizers


def count_gradient_all_reduces():
    """Counts GradientSync.average calls that all-reduce (the trainer's own gradient sync for train_steps)."""
    calls = []
    original = loop_optimizers.GradientSync.average

    def counting(self, params):
        calls.append(len(params))
        return original(self, params)

    loop_optimizers.GradientSync.average = counting
    return calls


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--root", required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    calls = count_gradient_all_reduces()
    common = dict(max_epochs=3, silent_mode=True, batch_accumulate=2)
    gan = GAN()
    Trainer("gan", args.root, device="cpu").train(
        model=gan, training_params=quiet_params(optimizer=GAN_OPTIMIZERS, train_step=gan_step, valid_metrics_list=[],
                                                metric_to_watch="g_loss", ema=True, clip_grad_norm=1.0, **common),
        train_loader=real_batches())
    gan_syncs = len(calls)
    text = TinyTextClassifier()
    Trainer("text", args.root, device="cpu").train(
        model=text, training_params=quiet_params(loss="model", metric_to_watch="loss", **common),
        train_loader=text_batches(), valid_loader=text_batches(2, seed=9))
    contrastive = make_model(classes=4)
    Trainer("contrastive", args.root, device="cpu").train(
        model=contrastive, training_params=quiet_params(train_step=contrastive_step, valid_metrics_list=[],
                                                        metric_to_watch="CrossEntropyLoss", **common),
        train_loader=[(x, y) for x, y in make_loader(n=40, batch_size=8)])
    torch.save({"gan": gan.state_dict(), "text": text.state_dict(), "contrastive": contrastive.state_dict(),
                "world": distributed.world_size(), "gan_syncs": gan_syncs, "syncs": len(calls)},
               os.path.join(args.out, f"rank{distributed.rank()}.pt"))


if __name__ == "__main__":
    main()
