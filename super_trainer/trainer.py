"""The Trainer: builds a run from training_params, then runs the loop that fires the events of SPEC §1.

Reading order: ``train`` → ``_prepare`` (build everything, restore a checkpoint) → ``_fit`` (the epoch loop)
→ ``_train_epoch`` / ``_validate`` / ``_test`` (each fires its events in diagram order, one per line).
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import math
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel

from . import distributed
from .batches import count_batches, numbered, rescale_grads, to_device, window_size
from .building import (
    autocast_and_scaler,
    restart_callback_states,
    step_takes_closure,
    build_criterion,
    build_optimizer,
    builtin_callbacks,
    check_metric_to_watch,
    convert_sync_bn,
    forward_module,
    known_loss_names,
    optimizer_steps_per_epoch,
    resolve_device,
    seed_everything,
    user_callbacks,
    write_params_yaml,
)
from .callbacks.base import Callback, CallbackHandler, PhaseContext
from .callbacks.logging import BaseLogger
from .callbacks.lr import TorchSchedulerCallback
from .checkpoint import (
    FORMAT,
    CheckpointError,
    CheckpointWriter,
    check_callback_states,
    check_optimizer_fits,
    epoch_checkpoints_to_prune,
    get_rng_state,
    read_checkpoint,
    set_rng_state,
    unwrap_model,
)
from .ema import ModelEMA
from .interrupts import DeferredInterrupt
from .metrics import (LossAverageMeter, LossAverager, build_metrics, lookup_metric, loss_names, make_collection,
                      metric_titles, metric_values)
from .params import TrainingParams, resolve_training_params
from .result import TrainingResult

__all__ = ["Trainer", "TrainingResult"]

logger = logging.getLogger("super_trainer")

LATEST = "ckpt_latest.pth"
BEST = "ckpt_best.pth"


@dataclasses.dataclass
class _Run:
    """What one ``train()`` call built and the loop's own bookkeeping. Everything a callback may change
    (criterion, loaders, stop flags, counters) lives on the context instead, so the trainer sees every write."""

    params: TrainingParams
    net: nn.Module  # the user's model (unwrapped), trained in place
    model: nn.Module  # what the forward pass calls: net, or DDP(net)
    optimizer: torch.optim.Optimizer
    callbacks: CallbackHandler
    context: PhaseContext
    test_loaders: Dict[str, Any]
    train_batches: Optional[int]  # batches per epoch, None when the loader has no len()
    train_metrics: Any
    valid_metrics: Any
    test_metrics: Any
    loss_names: Optional[List[str]]
    autocast: Any  # a reusable context manager: torch.autocast, or a no-op when mixed precision is off
    scaler: Optional[torch.amp.GradScaler]
    ema: Optional[ModelEMA]
    ckpt_dir: Path
    train_loader_counted: Any = None  # the train loader train_batches was counted for
    step_with_closure: bool = False  # the optimizer's step() wants a closure (LBFGS, SAM, ...)
    distributed: bool = False  # under torchrun (DDP)
    nan_check_every: int = 0  # read the losses every N optimizer steps (0: stop_on_non_finite_loss off)
    ckpt_every: int = 0  # save_ckpt_every_n_steps, 0 for none
    start_epoch: int = 0
    last_metrics: Dict[str, Any] = dataclasses.field(default_factory=dict)
    test_results: Dict[str, Dict[str, Any]] = dataclasses.field(default_factory=dict)
    rng_to_restore: Optional[Dict[str, Any]] = None
    resume_progress: Optional[Dict[str, Any]] = None  # a mid-epoch checkpoint's position in its epoch
    epoch_rng: Optional[Dict[str, Any]] = None  # RNG state the running epoch's loader iterator was created from
    epoch_started: float = 0.0
    states_checked: bool = False  # callback states passed the weights_only check
    last_checkpoint_step: int = -1  # global_step of the last mid-epoch checkpoint
    interrupt: DeferredInterrupt = dataclasses.field(default_factory=DeferredInterrupt)
    train_loss: LossAverager = dataclasses.field(default_factory=LossAverager)
    eval_loss: LossAverager = dataclasses.field(default_factory=LossAverager)
    ckpt_writer: CheckpointWriter = dataclasses.field(default_factory=CheckpointWriter)  # closed by _fit


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
        self.experiment_name = experiment_name
        self.ckpt_root_dir = Path(ckpt_root_dir)
        self.device = resolve_device(device)
        self._recipe_context: Dict[str, Any] = {}  # architecture, arch_params, ... when trained from a recipe
        self._on_validated: List[Callable[[Path], None]] = []  # a recipe's file writers, run once all is validated

    @property
    def ckpt_dir(self) -> Path:
        """The experiment dir."""
        return self.ckpt_root_dir / self.experiment_name

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
            from .recipes import load_recipe, train_from_recipe

            cfg = load_recipe(model, list(overrides))
            return train_from_recipe(cfg) if self is None else train_from_recipe(cfg, trainer=self)
        if overrides:
            raise ValueError("overrides apply to a recipe; with a model, change training_params instead")
        if self is None:
            raise TypeError("Trainer.train on the class takes a recipe; to train a model, make a Trainer first")
        if train_loader is None:
            raise ValueError("train_loader is required")
        params = resolve_training_params(training_params)
        run = self._prepare(model, params, train_loader, valid_loader, dict(test_loaders or {}))
        return self._fit(run)

    # ---- building -------------------------------------------------------------------------------------
    def _prepare(self, model: nn.Module, params: TrainingParams, train_loader: Any, valid_loader: Any,
                 test_loaders: Dict[str, Any]) -> _Run:
        if not isinstance(model, nn.Module):
            raise ValueError(f"model must be a torch.nn.Module or a recipe, got {type(model).__name__}")
        device = self.device
        is_distributed = distributed.init_from_env(device)
        if is_distributed and device.type == "cuda" and device.index is None:
            device = torch.device("cuda", distributed.local_rank())
            torch.cuda.set_device(device)
        if params.seed is not None:
            seed_everything(params.seed)

        net = convert_sync_bn(unwrap_model(model).to(device), params, is_distributed, device)
        optimizer = build_optimizer(net, params)
        criterion = build_criterion(params, device)
        train_batches = count_batches(train_loader, params.max_train_batches)
        if train_batches == 0:
            raise ValueError(f"train_loader has no batches (len(train_loader) == 0): nothing to train on; check the "
                             "dataset's size, batch_size and drop_last")
        if valid_loader is not None and count_batches(valid_loader, None) == 0:
            raise ValueError("valid_loader has no batches (len(valid_loader) == 0): validation metrics and "
                             "ckpt_best would be meaningless; pass valid_loader=None to train without validation")
        steps_per_epoch = optimizer_steps_per_epoch(params, train_batches)

        train_metrics = build_metrics(params.train_metrics_list, "training_params.train_metrics_list")
        valid_metrics = build_metrics(params.valid_metrics_list, "training_params.valid_metrics_list")
        test_spec = params.test_metrics_list if params.test_metrics_list is not None else params.valid_metrics_list
        test_metrics = build_metrics(test_spec, "training_params.test_metrics_list") if test_loaders else {}
        names = known_loss_names(criterion, params)

        autocast, scaler = autocast_and_scaler(params.mixed_precision, device)
        step_with_closure = step_takes_closure(optimizer)
        if step_with_closure and params.batch_accumulate > 1:
            raise ValueError(f"training_params.batch_accumulate: {type(optimizer).__name__}.step recomputes the loss "
                             "of the current batch through a closure, so it cannot accumulate; use batch_accumulate 1")
        if step_with_closure and scaler is not None:
            raise ValueError(f"training_params.mixed_precision: {type(optimizer).__name__}.step needs a closure, "
                             "which fp16's GradScaler does not support; use 'bf16' or no mixed precision")
        ema = ModelEMA(net, **params.ema_params) if params.ema else None
        given_callbacks = user_callbacks(params)
        callbacks = CallbackHandler(builtin_callbacks(params, steps_per_epoch, self.ckpt_dir) + given_callbacks)
        restart_callback_states(given_callbacks)  # as first given; a resume then loads the checkpoint's state
        if valid_loader is not None:  # after the callbacks: their metric_names are valid keys too
            check_metric_to_watch(params.metric_to_watch, criterion, names, metric_titles(valid_metrics),  # sg-recipes
                                  callbacks.callbacks)
        for callback in callbacks.callbacks:
            if isinstance(callback, TorchSchedulerCallback):
                callback.attach(optimizer)

        wrapped = net
        if is_distributed:
            wrapped = DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None)
        wrapped = forward_module(model, net, wrapped, params)  # torch_compile, or the user's compiled model

        sg_logger = next((cb for cb in callbacks.callbacks if isinstance(cb, BaseLogger)), None)
        if sg_logger is None and not isinstance(params.sg_logger, str):
            sg_logger = params.sg_logger
        context = PhaseContext(
            net=wrapped, optimizer=optimizer, criterion=criterion, device=device, ckpt_dir=self.ckpt_dir,
            experiment_name=self.experiment_name, sg_logger=sg_logger, train_loader=train_loader,
            valid_loader=valid_loader, training_params=params, metric_to_watch=params.metric_to_watch,
            train_metrics=train_metrics, valid_metrics=valid_metrics, ema_model=ema,
            lr_warmup_epochs=params.lr_warmup_epochs, global_step=0, epoch=0, max_epochs=params.max_epochs,
            steps_per_epoch=steps_per_epoch,
            total_steps=steps_per_epoch * params.max_epochs if steps_per_epoch is not None else None,
            batches_seen=0, rank=distributed.rank(), world_size=distributed.world_size(), history=[],
            loss_logging_items_names=names, ddp_silent_mode=not distributed.is_main_process(),  # sg-recipes
            **self._recipe_context,
        )
        run = _Run(
            params=params, net=net, model=wrapped, optimizer=optimizer, callbacks=callbacks,
            context=context, test_loaders=test_loaders, train_batches=train_batches,
            train_loader_counted=train_loader, step_with_closure=step_with_closure, distributed=is_distributed,
            nan_check_every=params.log_interval if params.stop_on_non_finite_loss else 0,
            ckpt_every=params.save_ckpt_every_n_steps or 0,
            train_metrics=make_collection(train_metrics, device), valid_metrics=make_collection(valid_metrics, device),
            test_metrics=make_collection(test_metrics, device), loss_names=names, autocast=autocast,
            scaler=scaler, ema=ema, ckpt_dir=self.ckpt_dir,
        )
        if params.resume:
            self._restore(run)
        if distributed.is_main_process():
            self.ckpt_dir.mkdir(parents=True, exist_ok=True)
            for write in self._on_validated:  # nothing is written into the experiment dir before this point
                write(self.ckpt_dir)
            write_params_yaml(params, self.ckpt_dir / "training_params.yaml")
        return run

    def _restore(self, run: _Run) -> None:
        """Load ckpt_latest (or resume_path) into the run, before any event fires."""
        params = run.params
        path = Path(params.resume_path) if params.resume_path else run.ckpt_dir / params.ckpt_name
        if params.resume_path is None and not path.exists():
            warnings.warn(f"resume=True but {path} does not exist yet; training from scratch", stacklevel=3)
            return
        state = read_checkpoint(path, weights_only=params.resume_weights_only)
        if params.load_opt_params:  # sg-recipes: SG's load_opt_params False restores the weights only
            check_optimizer_fits(run.optimizer, state, path)
        try:
            run.net.load_state_dict(state["net"])
            if params.load_opt_params:  # sg-recipes
                run.optimizer.load_state_dict(state["optimizer_state_dict"])
        except (RuntimeError, ValueError, KeyError) as err:
            raise CheckpointError(f"checkpoint {path} does not fit this model/optimizer: {err}") from err
        if run.scaler is not None and state["scaler_state_dict"]:
            run.scaler.load_state_dict(state["scaler_state_dict"])
        if run.ema is not None:
            if state["ema_net"] is not None:
                run.ema.load_state_dict(state["ema_net"])
            else:
                warnings.warn(f"{path} has no EMA weights; EMA starts from the restored weights", stacklevel=3)
                run.ema.load_state_dict(run.net.state_dict())
        unclaimed = run.callbacks.load_state_dict(state["callbacks"] or {})
        if unclaimed:
            warnings.warn(f"{path} holds state for callbacks not in this run: {unclaimed}", stacklevel=3)
        run.start_epoch = int(state["epoch"])
        if run.start_epoch >= params.max_epochs:
            warnings.warn(f"resume: {path} has already completed {run.start_epoch} epochs and max_epochs is "
                          f"{params.max_epochs}; nothing left to train (raise training_params.max_epochs to continue)",
                          stacklevel=3)
        run.context.global_step = int(state.get("global_step", 0))
        run.context.batches_seen = int(state.get("batches_seen", 0))
        run.context.best_metric, run.context.best_epoch = state["best_metric"], state.get("best_epoch")
        run.last_metrics = dict(state.get("metrics") or {})
        run.context.history = list(state.get("history") or [])
        run.rng_to_restore = state["rng_state"]
        run.resume_progress = state.get("epoch_progress")
        if run.resume_progress is not None:
            logger.info("resuming %s from %s in epoch %d after batch %d", self.experiment_name, path,
                        run.start_epoch, run.resume_progress["batches"])
        else:
            logger.info("resuming %s from %s at epoch %d", self.experiment_name, path, run.start_epoch)

    # ---- running ----------------------------------------------------------------------------------
    def _fit(self, run: _Run) -> TrainingResult:
        context, callbacks, params = run.context, run.callbacks, run.params
        context.epoch = run.start_epoch
        context.lock_trainer_owned()
        stop_reason = "completed"
        try:
            with run.interrupt:
                callbacks.on_training_start(context)
                if run.rng_to_restore is not None and run.resume_progress is None:
                    set_rng_state(run.rng_to_restore)  # after on_training_start: resumed epochs draw as the original
                elif run.rng_to_restore is None and distributed.is_main_process():
                    self._save_checkpoints(run, epochs_done=run.start_epoch, improved=False)  # loadable from step 0
                for epoch in range(run.start_epoch, params.max_epochs):
                    context.epoch = epoch
                    if not self._train_epoch(run):
                        break  # stopped mid-epoch: the partial epoch is not validated, tested nor saved
                    lr = context.epoch_lrs[0]
                    train_results = dict(context.metrics_dict)
                    valid_results: Dict[str, Any] = {}
                    improved = False
                    if context.valid_loader is not None and _validation_due(epoch, params):
                        valid_results = self._validate(run)
                        improved = self._track_best(run, valid_results)
                    context.stop_training = distributed.any_rank_true(context.stop_training, context.device)
                    last_epoch = epoch + 1 == params.max_epochs or context.stop_training
                    periodic_test = params.run_test_freq is not None and (epoch + 1) % params.run_test_freq == 0
                    if run.test_loaders and (periodic_test or last_epoch):
                        self._test_all(run)
                    context.history.append(_history_entry(epoch, lr, time.perf_counter() - run.epoch_started,
                                                      train_results, valid_results))
                    callbacks.on_epoch_end(context)
                    self._save_checkpoints(run, epochs_done=epoch + 1, improved=improved)
                    if context.stop_training:
                        break
            if context.stop_training:
                stop_reason = context.stop_reason or "stopped_by_callback"
        except KeyboardInterrupt:
            stop_reason = "interrupted"
            context.stop_training = True
            # info, not warning: EpochSummary prints the one-line report (which a notebook cell shows)
            logger.info("training interrupted; %s holds the last checkpointed state", run.ckpt_dir / LATEST)
        except BaseException as err:
            context.exception, stop_reason = err, "exception"
            raise
        finally:
            # The last checkpoint write lands before on_training_end, so callbacks there read finished files.
            write_error = _close_writer(run)
            if isinstance(write_error, KeyboardInterrupt):  # Ctrl-C during that wait
                stop_reason = "exception" if stop_reason == "exception" else "interrupted"
            elif write_error is not None and stop_reason != "exception":
                context.exception, stop_reason = write_error, "exception"
            context.stop_reason = stop_reason  # on_training_end sees the final reason
            callbacks.on_training_end(context)
        if write_error is not None:
            raise write_error
        return self._result(run, stop_reason)

    def _train_epoch(self, run: _Run) -> bool:
        """One pass over the train loader; False when a stop, a non-finite loss or Ctrl-C came during a batch."""
        context, callbacks, params = run.context, run.callbacks, run.params
        model, optimizer, accumulate, interrupt = run.model, run.optimizer, params.batch_accumulate, run.interrupt
        ckpt_every, ddp = run.ckpt_every, run.distributed
        n_batches = self._count_train_batches(run)
        resume, run.resume_progress = run.resume_progress, None
        model.train()
        run.train_loss.reset()
        if run.train_metrics is not None:
            run.train_metrics.reset()
        context.loss_avg_meter, context.metrics_compute_fn = LossAverageMeter(run.train_loss), run.train_metrics  # sg
        run.epoch_started = time.perf_counter() - (resume["seconds"] if resume else 0.0)
        context.epoch_start_step = context.global_step if resume is None else resume["epoch_start_step"]
        callbacks.on_train_loader_start(context)
        if resume is not None:  # an epoch-start schedule just ran again: the lr is the checkpoint's
            for group, lr in zip(optimizer.param_groups, resume["lrs"]):
                group["lr"] = lr
        # A stop requested outside a batch lets this epoch finish; hold it so the batch checks below
        # react only to stops requested during a batch.
        held_stop, context.stop_training = context.stop_training, False
        batches = self._epoch_batches(run, n_batches, resume)
        resumed_at = done = resume["batches"] if resume else 0  # batches whose work is in the weights (None: mid-update)
        in_batch = False
        try:
            for batch_idx, batch, is_last in batches:
                in_batch = True
                context.batch_idx = batch_idx
                context.inputs, context.target, context.additional_batch_items = to_device(batch, context.device)
                callbacks.on_train_batch_start(context)
                stepping = is_last or (batch_idx + 1) % accumulate == 0
                with run.autocast if stepping or not ddp else _LocalAccumulation(run):
                    context.preds = model(context.inputs)
                    context.loss, context.loss_log_items = self._loss(run, context.preds, context.target)
                run.train_loss.add(context.loss_log_items)
                if run.train_metrics is not None:
                    run.train_metrics.update(context.preds.detach(), context.target)
                callbacks.on_train_batch_loss_end(context)
                if ddp:  # every rank must agree before the collective in backward
                    context.stop_training = distributed.any_rank_true(context.stop_training, context.device)
                if not context.stop_training:
                    done = None
                    self._backward(run, batch_idx, n_batches)
                    callbacks.on_train_batch_backward_end(context)
                    if stepping and not context.stop_training:
                        self._optimizer_step(run, batch_idx, n_batches, is_last)
                done, in_batch = batch_idx + 1, False
                context.batches_seen += 1
                callbacks.on_train_batch_end(context)
                checkpoint_due = ckpt_every and not is_last and self._step_checkpoint_due(run)
                if interrupt.requested:  # the first Ctrl-C: stop here, where the state is consistent
                    context.stop_training = True
                if ddp:
                    context.stop_training = distributed.any_rank_true(context.stop_training, context.device)
                if interrupt.requested:
                    raise KeyboardInterrupt
                if context.stop_training:
                    break
                if checkpoint_due:
                    self._save_progress(run, done)
        except KeyboardInterrupt:  # Ctrl-C stops like a stop requested during a batch, and keeps its place
            context.stop_training, context.stop_reason = True, "interrupted"
            if in_batch:
                callbacks.on_train_batch_end(context)  # the interrupted batch still gets its end event
            if done is None:
                logger.warning("Ctrl-C came during a backward pass or optimizer step; %s holds the last "
                               "checkpointed state", run.ckpt_dir / LATEST)
            elif done > resumed_at and not self._non_finite_seen(run, "the Ctrl-C checkpoint"):
                self._save_progress(run, done)
        stopped_in_batch = context.stop_training
        if stopped_in_batch:
            optimizer.zero_grad(set_to_none=True)  # an unfinished accumulation window is dropped
        else:
            context.stop_training = held_stop
        context.metrics_dict = self._epoch_metrics(run, run.train_loss, run.train_metrics)
        context.epoch_lrs = [group["lr"] for group in optimizer.param_groups]  # before epoch-end schedules
        if not stopped_in_batch and params.stop_on_non_finite_loss and not _losses_finite(run, context.metrics_dict):
            self._stop_for_non_finite_loss(run)
            stopped_in_batch = True
        callbacks.on_train_loader_end(context)
        return not stopped_in_batch

    # ---- pieces of the train step, kept beside the loop so the loop reads like the diagram ---------
    def _backward(self, run: _Run, batch_idx: int, n_batches: Optional[int]) -> None:
        """loss.backward(), scaled by 1/window (accumulation) and by the AMP scaler."""
        context, accumulate = run.context, run.params.batch_accumulate
        window = window_size(batch_idx, n_batches, accumulate)
        loss = context.loss if window == 1 else context.loss / window
        if run.scaler is not None:
            loss = run.scaler.scale(loss)
        loss.backward()  # under DDP it all-reduces only on a stepping micro-batch (_LocalAccumulation)

    def _optimizer_step(self, run: _Run, batch_idx: int, n_batches: Optional[int], is_last: bool) -> None:
        """Unscale, on_train_batch_gradient_step_start, then the step unless a stop or ``skip_step`` came."""
        context, optimizer, scaler, accumulate = run.context, run.optimizer, run.scaler, run.params.batch_accumulate
        if scaler is not None:
            scaler.unscale_(optimizer)
        if is_last and n_batches is None and (batch_idx + 1) % accumulate:
            # len() unknown: micro-batches were scaled by 1/accumulate; the last window was shorter
            rescale_grads(run.net, accumulate / ((batch_idx % accumulate) + 1))
        run.callbacks.on_train_batch_gradient_step_start(context)
        if context.stop_training:
            return
        if context.skip_step:
            context.skip_step = False
            optimizer.zero_grad(set_to_none=True)
            if scaler is not None:
                scaler.update()  # ends this step's unscale_ bookkeeping
            return
        if run.step_with_closure:
            optimizer.step(StepClosure(self, run))
        elif scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        context.global_step += 1
        run.callbacks.on_train_batch_gradient_step_end(context)
        if run.nan_check_every and context.global_step % run.nan_check_every == 0:
            self._non_finite_seen(run, "training")

    def _count_train_batches(self, run: _Run) -> Optional[int]:
        """Batches in this epoch's pass over ``context.train_loader`` (a callback may have replaced it)."""
        loader = run.context.train_loader
        if loader is not run.train_loader_counted:
            run.train_loader_counted = loader
            counted = count_batches(loader, run.params.max_train_batches)
            steps = optimizer_steps_per_epoch(run.params, counted)
            if steps != run.context.steps_per_epoch and run.context.steps_per_epoch is not None:
                warnings.warn(f"context.train_loader was replaced by one with {steps} optimizer steps per epoch "
                              f"instead of {run.context.steps_per_epoch}; LR schedules and EMA computed their "
                              "horizon from the first loader", stacklevel=3)
            run.train_batches, run.context.steps_per_epoch = counted, steps
        return run.train_batches

    def _epoch_batches(self, run: _Run, n_batches: Optional[int],
                       resume: Optional[Dict[str, Any]]) -> Iterator[Tuple[int, Any, bool]]:
        """The epoch's (batch_idx, batch, is_last) iterator, created from a recorded RNG state. On a mid-epoch
        resume the loader is re-created from the checkpoint's epoch RNG state and the batches already trained
        are drawn and dropped (loaded, not trained), then the run continues from the checkpoint's RNG state."""
        if resume is not None:
            set_rng_state(resume["epoch_rng_state"])
        run.epoch_rng = get_rng_state()
        batches = numbered(run.context.train_loader, n_batches, run.params.max_train_batches)
        if resume is None:
            return batches
        for _ in range(resume["batches"]):
            next(batches)
        set_rng_state(run.rng_to_restore)
        items = resume["loss_items"]
        run.train_loss.load(items.to(run.context.device) if items is not None else None)
        if resume.get("grads"):
            for name, param in run.net.named_parameters():
                if name in resume["grads"]:
                    param.grad = resume["grads"][name].to(param.device)
        return batches

    def _step_checkpoint_due(self, run: _Run) -> bool:
        """A mid-epoch checkpoint is due once global_step reaches a new multiple of save_ckpt_every_n_steps
        (and the losses since the last check are finite)."""
        step = run.context.global_step
        if step % run.ckpt_every or step == run.last_checkpoint_step:
            return False
        return not self._non_finite_seen(run, "a step checkpoint")

    def _non_finite_seen(self, run: _Run, before: str) -> bool:
        """Reads the losses logged since the last check (one host sync); stops with "nan_loss" if any is NaN/Inf."""
        if not run.params.stop_on_non_finite_loss or run.train_loss.all_finite_since_check():
            return False
        self._stop_for_non_finite_loss(run)
        logger.warning("non-finite loss before %s; stopping without checkpointing epoch %d", before, run.context.epoch)
        return True

    def _stop_for_non_finite_loss(self, run: _Run) -> None:
        run.context.stop_training, run.context.stop_reason = True, "nan_loss"
        logger.warning("non-finite training loss in epoch %d: training stops (stop_reason 'nan_loss'); ckpt_latest "
                       "and ckpt_best keep the last good weights", run.context.epoch)

    def _validate(self, run: _Run) -> Dict[str, Any]:
        """One pass over the valid loader with the EMA weights when EMA is on; returns metrics_dict."""
        context, callbacks = run.context, run.callbacks
        callbacks.on_validation_loader_start(context)
        limit = run.params.max_valid_batches
        batches = numbered(context.valid_loader, count_batches(context.valid_loader, limit), limit)
        self._evaluate(run, batches, run.valid_metrics,
                       callbacks.on_validation_batch_start, callbacks.on_validation_batch_end)
        context.metrics_dict = self._epoch_metrics(run, run.eval_loss, run.valid_metrics)
        callbacks.on_validation_loader_end(context)
        return dict(context.metrics_dict)

    def _test_all(self, run: _Run) -> None:
        for name, loader in run.test_loaders.items():
            run.test_results[name] = self._test(run, name, loader)

    def _test(self, run: _Run, name: str, loader: Any) -> Dict[str, Any]:
        """One pass over a test loader; returns its metrics_dict."""
        context, callbacks = run.context, run.callbacks
        context.test_loader, context.test_loader_name = loader, name
        callbacks.on_test_loader_start(context)
        self._evaluate(run, numbered(loader, count_batches(loader, None), None), run.test_metrics,
                       callbacks.on_test_batch_start, callbacks.on_test_batch_end)
        context.metrics_dict = self._epoch_metrics(run, run.eval_loss, run.test_metrics)
        callbacks.on_test_loader_end(context)
        return dict(context.metrics_dict)

    def _evaluate(self, run: _Run, batches: Iterator[Tuple[int, Any, bool]], metrics: Any,
                  on_batch_start: Callable[[PhaseContext], None], on_batch_end: Callable[[PhaseContext], None]) -> None:
        """The batch loop shared by validation and test: forward, loss, metric update, no gradients."""
        context = run.context
        model = run.ema.ema if run.ema is not None else run.net
        was_training = model.training
        model.eval()
        run.eval_loss.reset()
        if metrics is not None:
            metrics.reset()
        context.loss_avg_meter, context.metrics_compute_fn = LossAverageMeter(run.eval_loss), metrics  # sg-recipes
        criterion, interrupt = context.criterion, run.interrupt
        with torch.no_grad():
            for batch_idx, batch, _ in batches:
                if interrupt.requested:  # Ctrl-C during evaluation: no need to wait for the pass to end
                    raise KeyboardInterrupt
                context.batch_idx = batch_idx
                context.inputs, context.target, context.additional_batch_items = to_device(batch, context.device)
                on_batch_start(context)
                with run.autocast:
                    context.preds = model(context.inputs)
                    if criterion is not None:
                        context.loss, context.loss_log_items = self._loss(run, context.preds, context.target)
                if criterion is not None:
                    run.eval_loss.add(context.loss_log_items)
                if metrics is not None:
                    metrics.update(context.preds, context.target)
                on_batch_end(context)
        model.train(was_training)

    # ---- pieces of the loop -----------------------------------------------------------------------
    def _loss(self, run: _Run, preds: Any, target: Any) -> Tuple[torch.Tensor, torch.Tensor]:
        """The criterion's value and its detached log items (the 0-d loss itself, or the ``(K,)`` components
        of a loss that returns ``(loss, components)``); names the components on first use."""
        out = run.context.criterion(preds, target)
        if type(out) is tuple:
            loss, components = out
            items = components.detach().reshape(-1)
            if run.loss_names is None or len(run.loss_names) != items.numel():
                _name_loss_items(run, items.numel())
            return loss, items
        if run.loss_names is None or len(run.loss_names) != 1:
            _name_loss_items(run, 1)
        return out, out.detach()

    def _epoch_metrics(self, run: _Run, losses: LossAverager, metrics: Any) -> Dict[str, Any]:
        results: Dict[str, Any] = dict(zip(run.loss_names or [], losses.average()))
        if metrics is not None:
            results.update(metric_values(metrics))
        return results

    def _track_best(self, run: _Run, valid_results: Mapping[str, Any]) -> bool:
        """Record the validation; fire on_validation_end_best_epoch when metric_to_watch strictly improved."""
        context = run.context
        run.last_metrics = dict(valid_results)
        value = lookup_metric(valid_results, run.params.metric_to_watch)
        better = (lambda a, b: a > b) if run.params.greater_metric_to_watch_is_better else (lambda a, b: a < b)
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return False
        if context.best_metric is not None and not better(value, context.best_metric):
            return False
        context.best_metric, context.best_epoch = value, context.epoch
        run.callbacks.on_validation_end_best_epoch(context)
        return True

    def _checkpoint_state(self, run: _Run, epochs_done: int) -> Dict[str, Any]:
        """The checkpoint dict of SPEC §3 for the state right now."""
        if not run.states_checked:
            check_callback_states(run.callbacks)  # fail at the first write, not at a resume months later
            run.states_checked = True
        schedulers = {cb.state_key: cb.state_dict() for cb in run.callbacks.callbacks
                      if isinstance(cb, TorchSchedulerCallback)}
        return {
            "format": FORMAT,
            "net": run.net.state_dict(),
            "epoch": epochs_done,
            "global_step": run.context.global_step,
            "batches_seen": run.context.batches_seen,
            "acc": lookup_metric(run.last_metrics, run.params.metric_to_watch),
            "best_metric": run.context.best_metric,
            "best_epoch": run.context.best_epoch,
            "metrics": _plain_metrics(run.last_metrics),
            "history": run.context.history,
            "optimizer_type": type(run.optimizer).__name__,
            "optimizer_state_dict": run.optimizer.state_dict(),
            "scaler_state_dict": run.scaler.state_dict() if run.scaler is not None else None,
            "ema_net": run.ema.state_dict() if run.ema is not None else None,
            "callbacks": run.callbacks.state_dict(),
            "rng_state": get_rng_state(),
            "lr_scheduler_state": schedulers or None,
        }

    def _save_checkpoints(self, run: _Run, epochs_done: int, improved: bool) -> None:
        """ckpt_latest always; ckpt_best when improved; ckpt_epoch_N when N is listed. Rank 0 only; none
        when save_model is False."""
        if not distributed.is_main_process() or not run.params.save_model:
            return
        state = self._checkpoint_state(run, epochs_done)
        paths, remove = [run.ckpt_dir / LATEST], []
        if epochs_done in run.params.save_ckpt_epoch_list:
            paths.append(run.ckpt_dir / f"ckpt_epoch_{epochs_done}.pth")
            run.ckpt_writer.flush()  # the previous ckpt_epoch file is on disk before counting what to prune
            remove = epoch_checkpoints_to_prune(run.ckpt_dir, run.params.max_keep_ckpts, adding=paths[-1])
        jobs = [(state, paths)]
        if improved and state["ema_net"] is not None:  # best holds the EMA weights as its net
            jobs.append((dict(state, net=state["ema_net"]), [run.ckpt_dir / run.params.ckpt_best_name]))
        elif improved:
            paths.append(run.ckpt_dir / run.params.ckpt_best_name)
        # Copies the state now (training may change it next) and writes it from a background thread; files
        # beyond max_keep_ckpts are deleted once the new ones are written.
        run.ckpt_writer.save_many(jobs, remove=remove)

    def _save_progress(self, run: _Run, batches_done: int) -> None:
        """ckpt_latest in the middle of an epoch: the state after ``batches_done`` batches of the running epoch,
        with what a resume needs to continue exactly (SPEC §7 "Mid-epoch checkpoints"). Rank 0 only."""
        run.last_checkpoint_step = run.context.global_step
        if not distributed.is_main_process() or not run.params.save_model:
            return
        state = self._checkpoint_state(run, epochs_done=run.context.epoch)
        grads = {name: p.grad for name, p in run.net.named_parameters() if p.grad is not None}  # the writer copies
        state["epoch_progress"] = {
            "batches": batches_done,
            "epoch_start_step": run.context.epoch_start_step,
            "epoch_rng_state": run.epoch_rng,
            "loss_items": run.train_loss.stacked(),
            "grads": grads or None,  # an accumulation window cut by Ctrl-C continues where it was
            "seconds": time.perf_counter() - run.epoch_started,
            "lrs": [group["lr"] for group in run.optimizer.param_groups],
        }
        run.ckpt_writer.save(state, run.ckpt_dir / LATEST)  # copied now, written in the background

    def _result(self, run: _Run, stop_reason: str) -> TrainingResult:
        best = run.ckpt_dir / run.params.get("ckpt_best_name", BEST)
        latest = run.ckpt_dir / LATEST
        return TrainingResult(
            best_metric=run.context.best_metric, best_epoch=run.context.best_epoch, metrics=dict(run.last_metrics),
            history=list(run.context.history), test_metrics=dict(run.test_results), ckpt_dir=str(run.ckpt_dir),
            best_ckpt_path=str(best) if best.exists() else None,
            latest_ckpt_path=str(latest) if latest.exists() else None, stop_reason=stop_reason,
            metric_to_watch=run.params.metric_to_watch, loss_names=list(run.loss_names or []),
        )

    # ---- testing a trained model ------------------------------------------------------------------
    def test(self, model: nn.Module, test_loader: Any, test_metrics_list: Any = ("Accuracy",),
             loss: Any = None, callbacks: Sequence[Callback] = (), name: str = "test",
             mixed_precision: Union[bool, str] = False) -> Dict[str, Any]:
        """Evaluate ``model`` on ``test_loader``; fires only the test events. Returns the metrics_dict
        (loss average first when ``loss`` is given, then the metrics)."""
        device = self.device
        net = unwrap_model(model).to(device)
        criterion = None
        if loss is not None:
            criterion = build_criterion(TrainingParams(loss=loss, criterion_params={}), device)
        metrics = build_metrics(list(test_metrics_list) if test_metrics_list is not None else [], "test_metrics_list")
        autocast, _ = autocast_and_scaler(mixed_precision, device)
        handler = CallbackHandler(callbacks)
        context = PhaseContext(net=net, device=device, criterion=criterion, experiment_name=self.experiment_name,
                               ckpt_dir=self.ckpt_dir, test_metrics=metrics)
        run = _Run(
            params=TrainingParams(), net=net, model=net, optimizer=None,  # type: ignore[arg-type]
            callbacks=handler, context=context, test_loaders={name: test_loader},
            train_batches=None, train_metrics=None, valid_metrics=None, test_metrics=make_collection(metrics, device),
            loss_names=known_loss_names(criterion, TrainingParams(loss_logging_items_names=None)) if criterion else [],
            autocast=autocast, scaler=None, ema=None, ckpt_dir=self.ckpt_dir,
        )
        return self._test(run, name, test_loader)

    @classmethod
    def resume_experiment(cls, experiment_name: str, ckpt_root_dir: Union[str, Path] = "checkpoints",
                          device: Union[str, torch.device, None] = None) -> TrainingResult:
        """Continue a recipe-trained experiment from its ckpt_latest, re-reading its saved recipe."""
        recipe = Path(ckpt_root_dir) / experiment_name / "recipe.yaml"
        if not recipe.is_file():
            raise FileNotFoundError(
                f"{recipe} not found: resume_experiment needs an experiment trained from a recipe; for one trained "
                "from Python call Trainer.train(..., training_params={..., 'resume': True}) with the same objects"
            )
        from .recipes import resume_from_recipe  # recipes are optional at import time

        return resume_from_recipe(recipe, device=device)


# ---- helpers (module level so the Trainer stays small) ---------------------------------------------

def _is_recipe(value: Any) -> bool:
    from omegaconf import DictConfig

    return isinstance(value, (str, Path, DictConfig)) or (isinstance(value, Mapping) and "training_hyperparams" in value)

def _name_loss_items(run: _Run, count: int) -> None:
    criterion = run.context.criterion
    declared = run.params.get("loss_logging_items_names") or getattr(criterion, "component_names", None)
    if declared and len(declared) != count:
        raise ValueError(f"training_params.loss_logging_items_names has {len(declared)} names but the loss "
                         f"returned {count} components")
    if run.loss_names is not None and len(run.loss_names) != count:
        raise ValueError(f"the loss returned {count} components, earlier batches {len(run.loss_names)}")
    run.loss_names = loss_names(criterion, list(declared) if declared else None, count if count > 1 else 0)
    run.context.loss_logging_items_names = run.loss_names  # sg-recipes


class _LocalAccumulation:
    """Autocast plus DDP's ``no_sync()`` for a micro-batch that does not step: DDP decides at forward time whether
    the backward all-reduces, so the forward must run inside no_sync (the all-reduce then happens once, on the
    window's stepping micro-batch, over the accumulated gradients)."""

    def __init__(self, run: _Run) -> None:
        self.run = run
        self.stack = contextlib.ExitStack()

    def __enter__(self) -> None:
        self.stack.enter_context(self.run.model.no_sync())
        self.stack.enter_context(self.run.autocast)

    def __exit__(self, *exc: Any) -> None:
        self.stack.close()


def _losses_finite(run: _Run, metrics: Mapping[str, Any]) -> bool:
    """The epoch's loss averages are finite (a NaN/Inf in any batch makes its average non-finite)."""
    return all(math.isfinite(metrics[name]) for name in run.loss_names or [] if isinstance(metrics.get(name), float))


class StepClosure:
    """The closure the trainer passes to ``optimizer.step`` for optimizers that take one (LBFGS, SAM, ...).

    Called while the weights are still those of the batch's backward, it returns the batch's loss without
    recomputing. Once the weights changed (SAM's perturbation, LBFGS's line search) it zeroes the gradients and
    recomputes forward, loss and backward on the current batch under the trainer's autocast. A weight change is
    seen through the parameters' version counters and, for writes through ``.data`` that bypass them, a norm
    fingerprint (one host sync per call; only these optimizers pay it)."""

    def __init__(self, trainer: "Trainer", run: _Run) -> None:
        self.trainer, self.run = trainer, run
        self.params = [p for p in run.net.parameters() if p.requires_grad]
        self.loss = run.context.loss.detach()
        self.versions, self.fingerprint = self._snapshot()

    def _snapshot(self) -> Tuple[List[int], Optional[torch.Tensor]]:
        with torch.no_grad():
            norms = torch.stack(torch._foreach_norm(self.params)) if self.params else None
        return [p._version for p in self.params], norms

    def __call__(self) -> torch.Tensor:
        versions, fingerprint = self._snapshot()
        unchanged = versions == self.versions and (fingerprint is None or torch.equal(fingerprint, self.fingerprint))
        if unchanged:
            return self.loss
        run, context = self.run, self.run.context
        run.optimizer.zero_grad(set_to_none=True)
        with torch.enable_grad(), run.autocast:
            preds = run.model(context.inputs)
            loss, _ = self.trainer._loss(run, preds, context.target)
        loss.backward()
        self.loss, self.versions, self.fingerprint = loss.detach(), versions, fingerprint
        return self.loss


def _close_writer(run: _Run) -> Optional[BaseException]:
    """Wait for the checkpoint write in flight; return its exception (already logged by the writer) instead of
    raising it, so that on_training_end still fires. An exception already propagating wins over it."""
    try:
        run.ckpt_writer.close()
    except KeyboardInterrupt as err:
        logger.warning("Ctrl-C while waiting for the last checkpoint write; it still completes before exit")
        return err
    except BaseException as err:
        return err
    return None


def _validation_due(epoch: int, params: TrainingParams) -> bool:
    done = epoch + 1
    return done % params.run_validation_freq == 0 or done == params.max_epochs or done in params.save_ckpt_epoch_list


def _history_entry(epoch: int, lr: float, seconds: float, train: Mapping[str, Any],
                   valid: Mapping[str, Any]) -> Dict[str, Any]:
    entry: Dict[str, Any] = {"epoch": epoch, "lr": lr, "seconds": seconds}
    entry.update({f"train/{k}": v for k, v in train.items()})
    entry.update({f"valid/{k}": v for k, v in valid.items()})
    return entry


def _plain_metrics(metrics: Mapping[str, Any]) -> Dict[str, Any]:
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float, list, str))}

