"""The Trainer: the public facade (SPEC §2). It keeps no state between calls.

Reading order: ``Trainer.train`` → ``building.build_run`` (everything the loop needs, validated before any event)
→ ``loop/fit.py`` ``TrainingLoop.fit`` → ``train_epoch``. docs/architecture.md has the map.
"""
from __future__ import annotations

import dataclasses
import functools
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import torch
import torch.nn as nn

from .building import RunInputs, autocast_and_scaler, build_run, join_process_group, resolve_device, write_run_files
from .callbacks.base import Callback, CallbackHandler
from .checks import check_experiment_name, check_test_loaders
from .context import PhaseContext
from .distributed import is_main_process
from .losses import build_criterion, known_loss_names
from .loop.checkpoints import LATEST, CheckpointManager
from .loop.evaluate import test_pass
from .loop.fit import TrainingLoop
from .loop.parts import Meters, RunParts
from .loop.resume import ResumePlan
from .metrics import build_metrics
from .modules import unwrap_model
from .params import TrainingParams, resolve_training_params
from .result import TrainingResult
from .runs import RunChoice, RunLock, agree_on_run, choose_run, latest_run_dir
from .steps import build_batch_reader

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
    Each ``train()`` call writes its checkpoints, logs and resolved params into its own run dir,
    ``<ckpt_root_dir>/<experiment_name>/RUN_<YYYYMMDD>_<HHMMSS>_<microseconds>/`` (``result.ckpt_dir``; see
    ``super_trainer.runs``).
    """

    def __init__(self, experiment_name: str = "experiment", ckpt_root_dir: Union[str, Path] = "checkpoints",
                 device: Union[str, torch.device, None] = None) -> None:
        self.experiment_name = check_experiment_name(experiment_name)
        self.ckpt_root_dir = Path(ckpt_root_dir)
        self.device = resolve_device(device)

    @property
    def ckpt_dir(self) -> Path:
        """The experiment dir, ``<ckpt_root_dir>/<experiment_name>``: it holds one run dir per ``train()`` call
        (each run's own dir is ``result.ckpt_dir``, and ``context.ckpt_dir`` while it trains)."""
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
        """Choose the run dir and build (ValueError before any event), lock the run dir (RunLockedError), read the
        checkpoint to resume from (CheckpointError before any event), fire on_optimizer_built and restore the
        checkpoint, write the run's description, then run the loop."""
        params = resolve_training_params(inputs.training_params)
        join_process_group(self.device)  # under torchrun: the ranks decide "resume: auto" together
        run = choose_run(self.ckpt_dir, params)  # which run dir, and what to resume from (reads only)
        parts, meters = build_run(dataclasses.replace(inputs, training_params=params), self.device, run.directory,
                                  self.experiment_name)
        run = agree_on_run(run, parts.context)  # under torchrun: rank 0's choice
        with RunLock(run.directory, enabled=is_main_process()):  # rank 0 owns the run dir until training ends
            plan = ResumePlan.start(parts, run.checkpoint)  # the checkpoint read, on_optimizer_built, its restore
            meters.last_valid = plan.last_metrics
            write_run_files(inputs, parts.params, run.directory)  # nothing is written into the dir before this
            checkpoints = CheckpointManager(parts, meters, run.directory, plan.kept_best)
            stop_reason = TrainingLoop(parts, meters, plan, checkpoints).fit()
        return _result(parts, meters, run, stop_reason)

    # ---- testing a trained model ------------------------------------------------------------------
    def test(self, model: nn.Module, test_loader: Any, test_metrics_list: Any = ("Accuracy",),
             loss: Any = None, callbacks: Sequence[Callback] = (), name: str = "test",
             mixed_precision: Union[bool, str] = False, batch_adapter: Any = None) -> dict:
        """Evaluate ``model`` on ``test_loader``; fires only the test events. Returns the metrics_dict
        (loss average first when ``loss`` is given, then the metrics). Batches are split as in training
        (``batch_adapter`` as training_params'); ``loss="model"`` averages the model's own loss."""
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
                         test_loaders={name: test_loader},
                         read_batch=build_batch_reader({"batch_adapter": batch_adapter, "loss": loss or ""}, device))
        known = known_loss_names(criterion, {}) if criterion is not None else []
        return test_pass(parts, Meters(context, None, known, {"test": metrics}, device), name, test_loader)

    @classmethod
    def resume_experiment(cls, experiment_name: str, ckpt_root_dir: Union[str, Path] = "checkpoints",
                          device: Union[str, torch.device, None] = None, run_id: Optional[str] = None
                          ) -> TrainingResult:
        """Continue a recipe-trained run from its ckpt_latest, re-reading its saved recipe: the run ``run_id``, else
        the experiment's latest run (by run dir name) with a checkpoint, else a 0.2 experiment dir's."""
        from omegaconf import OmegaConf

        from .recipes import RECIPE_FILE

        experiment_dir = Path(ckpt_root_dir) / experiment_name
        run_dir = experiment_dir / run_id if run_id is not None else (
            latest_run_dir(experiment_dir, needs=RECIPE_FILE) or latest_run_dir(experiment_dir, RECIPE_FILE))
        recipe = (run_dir or experiment_dir) / RECIPE_FILE
        if not recipe.is_file():
            raise FileNotFoundError(
                f"{recipe} not found: resume_experiment needs a run trained from a recipe; for one trained "
                "from Python call Trainer.train(..., training_params={..., 'resume': True}) with the same objects"
            )
        cfg = OmegaConf.load(recipe)
        cfg.training_hyperparams.resume = True
        if run_dir is not None:  # else a 0.2 experiment dir: continued in a new run dir
            cfg.training_hyperparams.run_id = run_dir.name
        if device is not None:
            cfg.device = str(device)
        return cls._for_dir(experiment_dir, cfg.get("device")).train(cfg)


def _is_recipe(value: Any) -> bool:
    from omegaconf import DictConfig

    return isinstance(value, (str, Path, DictConfig)) or (isinstance(value, Mapping) and "training_hyperparams" in value)


def _result(parts: RunParts, meters: Meters, run: RunChoice, stop_reason: str) -> TrainingResult:
    context, ckpt_dir = parts.context, run.directory
    best, latest = ckpt_dir / parts.params.ckpt_best_name, ckpt_dir / LATEST
    return TrainingResult(
        best_metric=context.best_metric, best_epoch=context.best_epoch, metrics=dict(meters.last_valid),
        history=list(context.history), test_metrics=dict(meters.test_results), ckpt_dir=str(ckpt_dir),
        best_ckpt_path=str(best) if best.exists() else None,
        latest_ckpt_path=str(latest) if latest.exists() else None, stop_reason=stop_reason,
        metric_to_watch=parts.params.metric_to_watch, loss_names=list(dict.fromkeys(meters.train_names + list(meters.loss_names or []))),
    )
