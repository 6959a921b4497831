"""The Trainer: the public facade (SPEC §2). It keeps no state between calls.

Reading order: ``Trainer.train`` → ``building.build_run`` (everything the loop needs, validated before any event)
→ ``loop/fit.py`` ``TrainingLoop.fit`` → ``train_epoch``. docs/architecture.md has the map.
"""
from __future__ import annotations

import functools
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import torch
import torch.nn as nn

from .building import RunInputs, autocast_and_scaler, build_run, resolve_device, write_run_files
from .callbacks.base import Callback, CallbackHandler
from .checks import check_experiment_name, check_test_loaders
from .context import PhaseContext
from .losses import build_criterion, known_loss_names
from .loop.checkpoints import LATEST, CheckpointManager
from .loop.evaluate import test_pass
from .loop.fit import TrainingLoop
from .loop.parts import Meters, RunParts
from .loop.resume import ResumePlan
from .metrics import build_metrics
from .modules import unwrap_model
from .params import TrainingParams
from .result import TrainingResult

__all__ = ["Trainer", "TrainingResult"]


class _class_or_instance_method:
    """A method that also works on the class (``self`` is then None): ``Trainer.train(recipe)``."""

    def __init__(self, function: Callable[..., Any]) -> None:
        self.function = function
        functools.update_wrapper(self, function)

    def __get__(self, instance: Any, owner: type) -> Callable[..., Any]:
        return functools.partial(self.function, instance)


class Trainer:
    """Runs training and testing; see SPEC §2.

    ``device``: "cpu", "cuda", "cuda:1", a torch.device, or None for CUDA when available.
    Checkpoints, logs and the resolved params go to ``<ckpt_root_dir>/<experiment_name>/``.
    """

    def __init__(self, experiment_name: str = "experiment", ckpt_root_dir: Union[str, Path] = "checkpoints",
                 device: Union[str, torch.device, None] = None) -> None:
        self.experiment_name = check_experiment_name(experiment_name)
        self.ckpt_root_dir = Path(ckpt_root_dir)
        self.device = resolve_device(device)

    @property
    def ckpt_dir(self) -> Path:
        """The experiment dir."""
        return self.ckpt_root_dir / self.experiment_name

    @classmethod
    def _for_dir(cls, experiment_dir: Path, device: Any) -> "Trainer":
        return cls(experiment_name=experiment_dir.name, ckpt_root_dir=experiment_dir.parent, device=device)

    # ------------------------------------------------------------------------------------------------
    @_class_or_instance_method
    def train(self, model: Any = None, training_params: Optional[Mapping[str, Any]] = None, train_loader: Any = None,
              valid_loader: Any = None, test_loaders: Optional[Mapping[str, Any]] = None,
              overrides: Sequence[str] = ()) -> TrainingResult:
        """Train ``model`` in place and return a :class:`TrainingResult`.

        ``model`` may instead be a recipe — a name under recipes/, a YAML path, or a DictConfig — and then
        everything is built from it (``Trainer.train(recipe)`` also works on the class, taking the experiment
        name, root dir and device from the recipe); ``overrides`` are Hydra overrides of the recipe, as for
        ``load_recipe`` (``["training_hyperparams.max_epochs=2"]``). Bad ``training_params`` raise ValueError and
        a bad checkpoint raises CheckpointError, both before any event fires. Once on_training_start has fired,
        on_training_end fires exactly once: after the last epoch, a stop, Ctrl-C (then
        ``stop_reason == "interrupted"``) or an exception (re-raised).
        """
        if _is_recipe(model):
            from .recipes import load_recipe, recipe_experiment_dir, run_inputs  # recipes load Hydra: only here

            cfg = load_recipe(model, list(overrides))
            trainer = self if self is not None else Trainer._for_dir(recipe_experiment_dir(cfg), cfg.get("device"))
            return trainer._run(run_inputs(cfg))
        if overrides:
            raise ValueError("overrides apply to a recipe; with a model, change training_params instead")
        if self is None:
            raise TypeError("Trainer.train on the class takes a recipe; to train a model, make a Trainer first")
        return self._run(RunInputs(model, training_params, train_loader, valid_loader, check_test_loaders(test_loaders)))

    def _run(self, inputs: RunInputs) -> TrainingResult:
        """Build (ValueError before any event), read the checkpoint to resume from (CheckpointError before any
        event), write the run's description, then run the loop."""
        parts, meters = build_run(inputs, self.device, self.ckpt_dir, self.experiment_name)
        plan = ResumePlan.read(parts, self.ckpt_dir) if parts.params.resume else ResumePlan()
        meters.last_valid = plan.last_metrics
        write_run_files(inputs, parts.params, self.ckpt_dir)  # nothing is written into the dir before this point
        stop_reason = TrainingLoop(parts, meters, plan, CheckpointManager(parts, meters, self.ckpt_dir)).fit()
        return _result(parts, meters, self.ckpt_dir, stop_reason)

    # ---- testing a trained model ------------------------------------------------------------------
    def test(self, model: nn.Module, test_loader: Any, test_metrics_list: Any = ("Accuracy",),
             loss: Any = None, callbacks: Sequence[Callback] = (), name: str = "test",
             mixed_precision: Union[bool, str] = False) -> dict:
        """Evaluate ``model`` on ``test_loader``; fires only the test events. Returns the metrics_dict
        (loss average first when ``loss`` is given, then the metrics)."""
        device = self.device
        net = unwrap_model(model).to(device)
        criterion = build_criterion(TrainingParams(loss=loss, criterion_params={}), device) if loss is not None \
            else None
        metrics = build_metrics(list(test_metrics_list) if test_metrics_list is not None else [], "test_metrics_list")
        autocast, _ = autocast_and_scaler(mixed_precision, device)
        context = PhaseContext(net=net, device=device, criterion=criterion, experiment_name=self.experiment_name,
                               ckpt_dir=self.ckpt_dir, test_metrics={})
        parts = RunParts(params=TrainingParams(), context=context, callbacks=CallbackHandler(callbacks), net=net,
                         model=net, optimizer=None, scaler=None, autocast=autocast, ema=None,
                         test_loaders={name: test_loader})
        known = known_loss_names(criterion, {}) if criterion is not None else []
        return test_pass(parts, Meters(context, None, known, {"test": metrics}, device), name, test_loader)

    @classmethod
    def resume_experiment(cls, experiment_name: str, ckpt_root_dir: Union[str, Path] = "checkpoints",
                          device: Union[str, torch.device, None] = None) -> TrainingResult:
        """Continue a recipe-trained experiment from its ckpt_latest, re-reading its saved recipe."""
        from omegaconf import OmegaConf

        from .recipes import RECIPE_FILE

        recipe = Path(ckpt_root_dir) / experiment_name / RECIPE_FILE
        if not recipe.is_file():
            raise FileNotFoundError(
                f"{recipe} not found: resume_experiment needs an experiment trained from a recipe; for one trained "
                "from Python call Trainer.train(..., training_params={..., 'resume': True}) with the same objects"
            )
        cfg = OmegaConf.load(recipe)
        cfg.training_hyperparams.resume = True
        if device is not None:
            cfg.device = str(device)
        return cls._for_dir(recipe.parent, cfg.get("device")).train(cfg)


def _is_recipe(value: Any) -> bool:
    from omegaconf import DictConfig

    return isinstance(value, (str, Path, DictConfig)) or (isinstance(value, Mapping) and "training_hyperparams" in value)


def _result(parts: RunParts, meters: Meters, ckpt_dir: Path, stop_reason: str) -> TrainingResult:
    context = parts.context
    best, latest = ckpt_dir / parts.params.ckpt_best_name, ckpt_dir / LATEST
    return TrainingResult(
        best_metric=context.best_metric, best_epoch=context.best_epoch, metrics=dict(meters.last_valid),
        history=list(context.history), test_metrics=dict(meters.test_results), ckpt_dir=str(ckpt_dir),
        best_ckpt_path=str(best) if best.exists() else None,
        latest_ckpt_path=str(latest) if latest.exists() else None, stop_reason=stop_reason,
        metric_to_watch=parts.params.metric_to_watch, loss_names=list(meters.loss_names or []),
    )
