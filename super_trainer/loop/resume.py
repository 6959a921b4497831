"""Resuming: :class:`ResumePlan` reads a checkpoint into the run before any event fires, and :class:`EpochCursor`
knows where the running epoch is. The cursor is the one place that writes and reads a mid-epoch checkpoint's
``epoch_progress`` record, so a resumed epoch sees the same batches, RNG, gradients and lrs as the original.

The loop consults the plan at two points only: at the start of the fit (restore the RNG) and when an epoch opens
(a fresh cursor, or one that continues the checkpoint's epoch).
"""
from __future__ import annotations

import logging
import time
import warnings
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple

from ..batches import numbered
from ..checkpoint import CheckpointError, check_optimizer_fits, read_checkpoint
from ..rng import get_rng_state, set_rng_state
from .parts import Meters, RunParts

__all__ = ["ResumePlan", "EpochCursor"]

logger = logging.getLogger("super_trainer")


class ResumePlan:
    """What a resume restores: read once, before any event (a bad checkpoint raises CheckpointError then)."""

    def __init__(self, start_epoch: int = 0, rng: Optional[Dict[str, Any]] = None,
                 progress: Optional[Dict[str, Any]] = None, last_metrics: Optional[Dict[str, Any]] = None) -> None:
        self.start_epoch = start_epoch
        self.rng = rng  # the RNG state at the checkpoint's moment
        self.progress = progress  # a mid-epoch checkpoint's epoch_progress record, until its epoch opens
        self.last_metrics = dict(last_metrics or {})  # the last validation's metrics_dict

    @property
    def resumed(self) -> bool:
        return self.rng is not None

    @classmethod
    def read(cls, parts: RunParts, ckpt_dir: Path) -> "ResumePlan":
        """Load ckpt_latest (or ``resume_path``) into the run's model, optimizer, scaler, EMA, callbacks and
        context counters. A missing ckpt_latest (not a missing resume_path) means a fresh start, with a warning."""
        params, context = parts.params, parts.context
        path = Path(params.resume_path) if params.resume_path else ckpt_dir / params.ckpt_name
        if params.resume_path is None and not path.exists():
            warnings.warn(f"resume=True but {path} does not exist yet; training from scratch", stacklevel=3)
            return cls()
        state = read_checkpoint(path, weights_only=params.resume_weights_only)
        _load_model_state(parts, state, path)
        unclaimed = parts.callbacks.load_state_dict(state["callbacks"] or {})
        if unclaimed:
            warnings.warn(f"{path} holds state for callbacks not in this run: {unclaimed}", stacklevel=3)
        start_epoch = int(state["epoch"])
        if start_epoch >= params.max_epochs:
            warnings.warn(f"resume: {path} has already completed {start_epoch} epochs and max_epochs is "
                          f"{params.max_epochs}; nothing left to train (raise training_params.max_epochs to continue)",
                          stacklevel=3)
        context.global_step = int(state.get("global_step", 0))
        context.batches_seen = int(state.get("batches_seen", 0))
        context.update_context(epoch=start_epoch, best_metric=state["best_metric"], best_epoch=state.get("best_epoch"),
                               history=list(state.get("history") or []))
        plan = cls(start_epoch, state["rng_state"], state.get("epoch_progress"), state.get("metrics"))
        where = f"in epoch {start_epoch} after batch {plan.progress['batches']}" if plan.progress else \
            f"at epoch {start_epoch}"
        logger.info("resuming %s from %s %s", context.experiment_name, path, where)
        return plan

    def at_training_start(self) -> None:
        """After on_training_start: an epoch-boundary resume draws as the original from here (a mid-epoch resume
        restores its RNG when its epoch reopens)."""
        if self.rng is not None and self.progress is None:
            set_rng_state(self.rng)

    def open_epoch(self, parts: RunParts, meters: Meters, n_batches: Optional[int]) -> "EpochCursor":
        """The running epoch's cursor: fresh, or continuing the checkpoint's epoch (once)."""
        progress, self.progress = self.progress, None
        cursor = EpochCursor(parts, meters, n_batches, progress, self.rng)
        start_step = progress["epoch_start_step"] if progress else parts.context.global_step
        parts.context.trainer_update(epoch_start_step=start_step)
        return cursor


def _load_model_state(parts: RunParts, state: Dict[str, Any], path: Path) -> None:
    """Weights, optimizer (unless SG's ``load_opt_params`` is False: weights only), scaler and EMA."""
    with_optimizer = parts.params.get("load_opt_params", True)
    if with_optimizer:
        check_optimizer_fits(parts.optimizer, state, path)
    try:
        parts.net.load_state_dict(state["net"])
        if with_optimizer:
            parts.optimizer.load_state_dict(state["optimizer_state_dict"])
    except (RuntimeError, ValueError, KeyError) as err:
        raise CheckpointError(f"checkpoint {path} does not fit this model/optimizer: {err}") from err
    if parts.scaler is not None and state["scaler_state_dict"]:
        parts.scaler.load_state_dict(state["scaler_state_dict"])
    if parts.ema is not None:
        if state["ema_net"] is not None:
            parts.ema.load_state_dict(state["ema_net"])
        else:
            warnings.warn(f"{path} has no EMA weights; EMA starts from the restored weights", stacklevel=4)
            parts.ema.load_state_dict(parts.net.state_dict())


class EpochCursor:
    """Where the running epoch is: the batches whose work is in the weights, whether a batch is running, the RNG
    state its loader iterator was created from, when it started, and (resumed) the checkpoint's record."""

    def __init__(self, parts: RunParts, meters: Meters, n_batches: Optional[int],
                 progress: Optional[Dict[str, Any]], rng_after: Optional[Dict[str, Any]]) -> None:
        self.parts, self.meters, self.n_batches = parts, meters, n_batches
        self.progress, self.rng_after = progress, rng_after
        self.resumed_at = progress["batches"] if progress else 0
        self.done: Optional[int] = self.resumed_at  # batches whose work is in the weights; None mid-update
        self.in_batch = False
        self.epoch_rng: Optional[Dict[str, Any]] = None
        self.started = time.perf_counter() - (progress["seconds"] if progress else 0.0)
        self._owned = parts.context.owned_fields()

    def restore_lrs(self) -> None:
        """After on_train_loader_start of a resumed epoch: an epoch-start schedule just ran again, but the lr
        is the checkpoint's."""
        if self.progress is not None:
            for group, lr in zip(self.parts.optimizer.param_groups, self.progress["lrs"]):
                group["lr"] = lr

    def batches(self) -> Iterator[Tuple[int, Any, bool]]:
        """The epoch's ``(batch_idx, batch, is_last)``, its loader iterator created from a recorded RNG state. A
        resumed epoch re-creates the iterator from the checkpoint's epoch RNG state, draws and drops the batches
        already trained (loaded, not trained), then continues from the checkpoint's RNG state, loss items and
        gradients."""
        progress, context = self.progress, self.parts.context
        if progress is not None:
            set_rng_state(progress["epoch_rng_state"])
        self.epoch_rng = get_rng_state()
        batches = numbered(context.train_loader, self.n_batches, self.parts.params.max_train_batches)
        if progress is None:
            return batches
        for _ in range(progress["batches"]):
            next(batches)
        set_rng_state(self.rng_after)
        items = progress["loss_items"]
        self.meters.train_loss.load(items.to(context.device) if items is not None else None)
        grads = progress.get("grads") or {}
        for name, param in self.parts.net.named_parameters():
            if name in grads:
                param.grad = grads[name].to(param.device)
        return batches

    def begin(self, batch_idx: int) -> None:
        self.in_batch = True
        self._owned["batch_idx"] = batch_idx

    def updating(self) -> None:
        """Backward starts: until the batch ends, gradients and weights are mid-update (no checkpoint there)."""
        self.done = None

    def end(self, batch_idx: int) -> None:
        self.done, self.in_batch = batch_idx + 1, False
        self.parts.context.batches_seen += 1

    def seconds(self) -> float:
        return time.perf_counter() - self.started

    def record(self) -> Dict[str, Any]:
        """The ``epoch_progress`` record of a mid-epoch checkpoint taken after ``done`` batches (SPEC §7)."""
        net, optimizer = self.parts.net, self.parts.optimizer
        grads = {name: p.grad for name, p in net.named_parameters() if p.grad is not None}  # the writer copies
        return {
            "batches": self.done,
            "epoch_start_step": self.parts.context.epoch_start_step,
            "epoch_rng_state": self.epoch_rng,
            "loss_items": self.meters.train_loss.stacked(),
            "grads": grads or None,  # an accumulation window cut by Ctrl-C continues where it was
            "seconds": self.seconds(),
            "lrs": [group["lr"] for group in optimizer.param_groups],
        }

    def lrs(self) -> List[float]:
        return [group["lr"] for group in self.parts.optimizer.param_groups]
