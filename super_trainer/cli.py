"""``super-trainer``: train a recipe from the command line (Hydra).

    super-trainer                                   # the default recipe
    super-trainer --config-name=NAME key=value ...  # a recipe under recipes/, with overrides
    super-trainer --config-dir DIR --config-name=MY # your own recipes (they may use the shipped groups)
    super-trainer -m training_hyperparams.initial_lr=0.1,0.01   # a sweep: one experiment dir per job
    super-trainer --cfg job                         # print the composed recipe, train nothing
    super-trainer --nproc 4 ...                     # launch 4 processes with torchrun

Exit codes: 0 when training ends (completed or stopped by a callback), 130 after Ctrl-C, 1 on an error.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import List, Optional

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from .distributed import is_main_process
from .recipes import recipes_dir, train_from_recipe

__all__ = ["main"]


def _pop_nproc(argv: List[str]) -> Optional[int]:
    for i, arg in enumerate(argv):
        if arg == "--nproc" and i + 1 < len(argv):
            value = argv[i + 1]
            del argv[i:i + 2]
        elif arg.startswith("--nproc="):
            value = arg.split("=", 1)[1]
            del argv[i]
        else:
            continue
        if not value.isdigit() or int(value) < 1:
            raise SystemExit(f"super-trainer: --nproc takes a number of processes >= 1, got {value!r}")
        return int(value)
    return None


def _experiment_dir(cfg: DictConfig) -> Path:
    """Hydra's output dir when it lies in ckpt_root_dir (the shipped base recipe arranges that, so `.hydra/`
    sits beside the checkpoints), else ``<ckpt_root_dir>/<experiment_name>`` (``_<job number>`` in a sweep)."""
    hydra_cfg = HydraConfig.get()
    output = Path(hydra_cfg.runtime.output_dir)
    root = Path(str(cfg.get("ckpt_root_dir", "checkpoints")))
    if output.parent.resolve() == root.resolve():
        return output
    name = str(cfg.experiment_name)
    if hydra_cfg.mode == RunMode.MULTIRUN:
        name = f"{name}_{hydra_cfg.job.num}"
    return root / name


@hydra.main(config_path=str(recipes_dir()), config_name="default", version_base="1.3")
def _run(cfg: DictConfig) -> None:
    result = train_from_recipe(cfg, experiment_dir=_experiment_dir(cfg))
    if is_main_process():
        best = f"{result.best_metric:.4f}" if isinstance(result.best_metric, float) else result.best_metric
        watched = cfg.training_hyperparams.get("metric_to_watch", "Accuracy")
        print(f"{Path(result.ckpt_dir).name}: {result.stop_reason}; best {watched} {best} at epoch {result.best_epoch}")
        print(f"experiment dir: {result.ckpt_dir}  (tensorboard --logdir {result.ckpt_dir})")
    if result.stop_reason == "interrupted":
        sys.exit(130)


def main() -> None:
    """Entry point of ``super-trainer`` and ``python -m super_trainer.train_from_recipe``."""
    argv = sys.argv[1:]
    nproc = _pop_nproc(argv)
    if nproc and nproc > 1 and int(os.environ.get("WORLD_SIZE", "1")) == 1:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                   "-m", "super_trainer.train_from_recipe", *argv]
        sys.exit(subprocess.call(command))
    sys.argv = [sys.argv[0], *argv]
    try:
        _run()
    except KeyboardInterrupt:  # raised outside training (e.g. while building): same code as during it
        sys.exit(130)


if __name__ == "__main__":
    main()
