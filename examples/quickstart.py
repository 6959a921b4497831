"""Train a small MLP on a generated data set (offline, CPU, seconds) and say where the results went.

Run with ``make train`` or ``python examples/quickstart.py [--epochs N] [--ckpt-root-dir DIR]``.
"""
import argparse

from super_trainer import Trainer
from super_trainer.data import synthetic_loaders
from super_trainer.models import MLP


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--ckpt-root-dir", default="checkpoints")
    parser.add_argument("--experiment-name", default="quickstart")
    args = parser.parse_args()

    train_loader, valid_loader, test_loader = synthetic_loaders(batch_size=64)
    model = MLP(in_features=64, num_classes=10, hidden=(128,))
    trainer = Trainer(experiment_name=args.experiment_name, ckpt_root_dir=args.ckpt_root_dir, device="cpu")
    result = trainer.train(
        model=model,
        training_params={
            "max_epochs": args.epochs,
            "initial_lr": 0.02,
            "optimizer": "SGD",
            "optimizer_params": {"momentum": 0.9, "weight_decay": 1e-4},
            "lr_mode": "cosine",
            "lr_warmup_epochs": 1,
            "loss": "CrossEntropyLoss",
            "valid_metrics_list": ["Accuracy", "Top5"],
            "metric_to_watch": "Accuracy",
        },
        train_loader=train_loader,
        valid_loader=valid_loader,
        test_loaders={"test": test_loader},
    )
    print(f"best valid Accuracy {result.best_metric:.4f} at epoch {result.best_epoch}; "
          f"test Accuracy {result.test_metrics['test']['Accuracy']:.4f} ({result.stop_reason})")
    print(f"checkpoints: {result.best_ckpt_path}, {result.latest_ckpt_path}")
    print(f"TensorBoard logs: tensorboard --logdir {result.ckpt_dir}")


if __name__ == "__main__":
    main()
