"""Shared helpers: tiny deterministic data, models and an event recorder."""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any, Dict, List

import pytest
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, TensorDataset

from super_trainer import Callback
from super_trainer.callbacks.base import EVENTS

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("PYTHONHASHSEED", "0")


def make_data(n: int = 64, features: int = 8, classes: int = 3, seed: int = 0) -> TensorDataset:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, features, generator=generator)
    w = torch.randn(features, classes, generator=generator)
    y = (x @ w).argmax(dim=1)
    return TensorDataset(x, y)


def make_loader(n: int = 64, batch_size: int = 8, shuffle: bool = False, seed: int = 0, **kw: Any) -> DataLoader:
    return DataLoader(make_data(n, seed=seed, **kw), batch_size=batch_size, shuffle=shuffle)


def make_model(features: int = 8, classes: int = 3, hidden: int = 16, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(features, hidden), nn.ReLU(), nn.Linear(hidden, classes))


def quiet_params(**overrides: Any) -> Dict[str, Any]:
    params: Dict[str, Any] = {
        "max_epochs": 2,
        "initial_lr": 0.1,
        "loss": "CrossEntropyLoss",
        "valid_metrics_list": ["Accuracy"],
        "metric_to_watch": "Accuracy",
        "sg_logger": "base",
        "progress_bar": False,
    }
    params.update(overrides)
    return params


class NoLen:
    """An iterable loader without len(): the trainer cannot count its batches in advance."""

    def __init__(self, loader):
        self.loader = loader

    def __iter__(self):
        return iter(self.loader)


class Recorder(Callback):
    """Records every event it receives, with epoch and batch_idx. ``on_checkpoint_saved`` goes to ``saved``
    instead of ``events``: it follows whichever batch a background write finished in, so its place in the trace
    depends on timing (tests/test_steps.py checks it)."""

    def __init__(self) -> None:
        self.events: List[str] = []
        self.detail: List[tuple] = []
        self.saved: List[tuple] = []

    def _record(self, name: str, context: Any) -> None:
        if name == "on_checkpoint_saved":
            self.saved.append((len(self.events), context.global_step, list(context.checkpoint_paths)))
            return
        self.events.append(name)
        self.detail.append((name, context.epoch, context.batch_idx, context.global_step))


def _make_recording(event: str):
    def method(self: Recorder, context: Any) -> None:
        self._record(event, context)

    method.__name__ = event
    return method


for _event in EVENTS:
    setattr(Recorder, _event, _make_recording(_event))


@pytest.fixture
def tmp_ckpt(tmp_path: Path) -> Path:
    return tmp_path / "ckpts"


def python_env() -> Dict[str, str]:
    env = dict(os.environ)
    env["PYTHONFAULTHANDLER"] = "1"  # a crashing child prints every thread's stack
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "tests")] + [p for p in [env.get("PYTHONPATH")] if p])
    return env


PYTHON = sys.executable


def only_run(experiment_dir: Path) -> Path:
    """The run dir of an experiment trained (and resumed) as one run: ``<root>/<experiment>/RUN_...``."""
    runs = sorted(p for p in Path(experiment_dir).iterdir() if p.is_dir() and p.name.startswith("RUN_"))
    assert len(runs) == 1, f"expected one run dir in {experiment_dir}, found {[p.name for p in runs]}"
    return runs[0]
