"""Resuming: :class:`ResumePlan` reads a checkpoint into the run before any event fires, and :class:`EpochCursor`
knows where the running epoch is. The cursor is the one place that writes and reads a mid-epoch checkpoint's
``epoch_progress`` record, so a resumed epoch sees the same batches, RNG, gradients and lrs as the original.

``ResumePlan.start`` also fires on_optimizer_built (between reading the file and restoring it). The loop consults
the plan at two points only: at the start of the fit (restore the RNG) and when an epoch opens
(a fresh cursor, or one that continues the checkpoint's epoch).

A DataLoader with ``persistent_workers`` keeps one iterator for all epochs: the uninterrupted run created it (a
base seed and the sampler's seed drawn from the global RNG) in its first epoch and only reset it later (the
sampler's seed alone). A resumed run creates that iterator once from a throwaway RNG state
(:func:`iterate_as_before`), so its later ``iter()`` calls draw what the uninterrupted run drew. The workers' own
RNG (random transforms inside them) lives in their processes and cannot be restored: a warning says so.
"""
from __future__ import annotations

import logging
import time
import warnings
from pathlib import Path
from typing import Any, Dict, Iterator, List, Mapping, Optional, Tuple

import torch

from .. import distributed
from ..batches import numbered
from ..checkpoint import CheckpointError, read_checkpoint
from ..fsdp import full_state_dicts, is_fsdp2, load_full_state_dicts
from ..metrics import load_metric_states, metric_states
from ..params import plain_value
from ..rng import get_rng_state, set_rng_state
from .optimizers import optimizers_built
from .parts import Meters, RunParts
from .shards import ShardStore

__all__ = ["ResumePlan", "EpochCursor", "plain_params", "iterate_as_before"]

logger = logging.getLogger("super_trainer")


class ResumePlan:
    """What a resume restores: read once, before on_training_start (a missing or broken checkpoint raises
    CheckpointError before any event; one that does not fit the optimizers, after on_optimizer_built)."""

    def __init__(self, start_epoch: int = 0, rng: Optional[Dict[str, Any]] = None,
                 progress: Optional[Dict[str, Any]] = None, last_metrics: Optional[Dict[str, Any]] = None,
                 kept_best: Optional[List[Dict[str, Any]]] = None) -> None:
        self.start_epoch = start_epoch
        self.rng = rng  # the RNG state at the checkpoint's moment
        self.progress = progress  # a mid-epoch checkpoint's epoch_progress record, until its epoch opens
        self.last_metrics = dict(last_metrics or {})  # the last validation's metrics_dict
        self.kept_best = list(kept_best or [])  # the save_top_k files the checkpoint's run kept
        self.context: Any = None  # the run's context, when resuming
        self.warned_workers = False  # the persistent-workers warning was given

    @property
    def resumed(self) -> bool:
        return self.rng is not None

    @classmethod
    def start(cls, parts: RunParts, path: Optional[Path]) -> "ResumePlan":
        """Before on_training_start: read the checkpoint at ``path`` (the one ``runs.choose_run`` picked: the run
        dir's ckpt_latest, or ``resume_path``; None for a fresh start; a broken file is a CheckpointError before any
        event), fire on_optimizer_built, then restore the checkpoint into the run, so the param groups added at that
        event are there when the optimizer state loads."""
        state, failed = None, None
        try:
            state = read_checkpoint(path, weights_only=parts.params.resume_weights_only) if path is not None else None
        except CheckpointError as err:
            failed = err
        check_same_checkpoint(state, path, failed)  # under torchrun: every rank read the same one, or all fail
        if failed is not None:
            raise failed
        optimizers_built(parts)
        return cls._restore(parts, state, path) if state is not None else cls()

    @classmethod
    def _restore(cls, parts: RunParts, state: Dict[str, Any], path: Path) -> "ResumePlan":
        """Load the checkpoint into the run's model, optimizers, scaler, EMA, callbacks and context counters."""
        params, context = parts.params, parts.context
        _load_model_state(parts, state, path)
        warn_changed_params(state.get("training_params"), params, path)
        unclaimed = parts.callbacks.load_state_dict(state["callbacks"] or {})
        if unclaimed:
            warnings.warn(f"{path} holds state for callbacks not in this run: {unclaimed}", stacklevel=4)
        start_epoch = int(state["epoch"])
        context.global_step = int(state.get("global_step", 0))
        _warn_when_done(path, start_epoch, context.global_step, params)
        context.batches_seen = int(state.get("batches_seen", 0))
        context.trainer_update(epoch=start_epoch, best_metric=state["best_metric"], best_epoch=state.get("best_epoch"),
                               history=list(state.get("history") or []))
        progress, rng = own_share(state, path)
        plan = cls(start_epoch, rng, progress, state.get("metrics"), state.get("top_k"))
        plan.context = context
        where = f"in epoch {start_epoch} after batch {plan.progress['batches']}" if plan.progress else \
            f"at epoch {start_epoch}"
        logger.info("resuming %s from %s %s", context.experiment_name, path, where)
        return plan

    def at_training_start(self) -> None:
        """After on_training_start: an epoch-boundary resume draws as the original from here (a mid-epoch resume
        restores its RNG when its epoch reopens). A persistent-workers valid loader the original run had already
        iterated gets its iterator now (without changing the RNG), as it had one then."""
        if self.rng is not None and self.progress is None:
            set_rng_state(self.rng)
        context = self.context
        if context is not None and any(key.startswith("valid/") for entry in context.history or () for key in entry):
            iterate_as_before(context.valid_loader, self)

    def open_epoch(self, parts: RunParts, meters: Meters) -> "EpochCursor":
        """The running epoch's cursor: fresh, or continuing the checkpoint's epoch (once)."""
        progress, self.progress = self.progress, None
        cursor = EpochCursor(parts, meters, progress, self.rng,
                             self if self.resumed and parts.context.epoch > 0 else None)
        start_step = progress["epoch_start_step"] if progress else parts.context.global_step
        parts.context.trainer_update(epoch_start_step=start_step)
        return cursor


def _warn_when_done(path: Path, epochs: int, steps: int, params: Any) -> None:
    if epochs >= params.max_epochs:
        warnings.warn(f"resume: {path} has already completed {epochs} epochs and max_epochs is "
                      f"{params.max_epochs}; nothing left to train (raise training_params.max_epochs to continue)",
                      stacklevel=4)
    elif params.max_steps is not None and steps >= params.max_steps:
        warnings.warn(f"resume: {path} has already taken {steps} optimizer steps and max_steps is "
                      f"{params.max_steps}; nothing left to train (raise training_params.max_steps to continue)",
                      stacklevel=4)


def _load_model_state(parts: RunParts, state: Dict[str, Any], path: Path) -> None:
    """Weights, optimizers (unless SG's ``load_opt_params`` is False: weights only), scaler and EMA."""
    with_optimizer = parts.params.get("load_opt_params", True)
    fsdp2 = is_fsdp2(parts.net)
    if state.get("sharded"):  # fsdp_params.checkpoint: sharded (loop/shards.py)
        return _load_shards(parts, state, path, with_optimizer)
    if with_optimizer:  # before anything is loaded: a refused checkpoint leaves the model as it was
        parts.optimizers.check(state, path)
    if fsdp2:  # every rank read the file: a misfit raises on every rank, before the collectives below
        _check_full_weights(parts.net, state["net"], path)
        if parts.ema is not None and state["ema_net"] is not None:
            _check_full_weights(parts.net, state["ema_net"], path)
    try:
        if fsdp2:  # the full tensors (rank 0's) are scattered into every rank's shards: a collective
            load_full_state_dicts(parts.net, parts.optimizer if with_optimizer else None, state["net"],
                                  state["optimizer_state_dict"] if with_optimizer else None)
        else:
            parts.net.load_state_dict(state["net"])
            if with_optimizer:
                parts.optimizers.load(state)
    except (RuntimeError, ValueError, KeyError) as err:
        raise CheckpointError(f"checkpoint {path} does not fit this model/optimizer: {err}") from err
    if parts.scaler is not None and state["scaler_state_dict"]:
        parts.scaler.load_state_dict(state["scaler_state_dict"])
    if parts.ema is not None:  # ShardedModelEMA.load_state_dict is a collective too (every rank gets here)
        if state["ema_net"] is not None:
            parts.ema.load_state_dict(state["ema_net"])
        else:
            warnings.warn(f"{path} has no EMA weights; EMA starts from the restored weights", stacklevel=4)
            parts.ema.load_state_dict(full_state_dicts(parts.net)[0] or {} if fsdp2 else parts.net.state_dict())


def _load_shards(parts: RunParts, state: Dict[str, Any], path: Path, with_optimizer: bool) -> None:
    if not (is_fsdp2(parts.net) and distributed.is_distributed()):
        raise CheckpointError(f"{path} holds its weights as torch.distributed.checkpoint shards (fsdp_params."
                              "checkpoint: sharded): resume it under torchrun with fsdp: true")
    try:
        ShardStore.read(parts, state, path, with_optimizer)
    except (RuntimeError, ValueError, KeyError) as err:
        raise CheckpointError(f"the shards of {path} do not fit this model/optimizer: {err}") from err
    if parts.scaler is not None and state["scaler_state_dict"]:
        parts.scaler.load_state_dict(state["scaler_state_dict"])


def _check_full_weights(net: torch.nn.Module, weights: Mapping[str, Any], path: Path) -> None:
    """CheckpointError unless ``weights`` has exactly the keys and full shapes of the sharded ``net``'s state_dict
    (a DTensor's ``shape`` is the full one)."""
    own = net.state_dict()
    unfit = sorted(set(own) ^ set(weights)) + sorted(k for k in set(own) & set(weights)
                                                     if tuple(own[k].shape) != tuple(weights[k].shape))
    if unfit:
        raise CheckpointError(f"checkpoint {path} does not fit this model: keys missing, unexpected or of another "
                              f"shape: {unfit[:5]}")


class EpochCursor:
    """Where the running epoch is: the batches whose work is in the weights, whether a batch is running, the RNG
    state its loader iterator was created from, when it started, and (resumed) the checkpoint's record."""

    def __init__(self, parts: RunParts, meters: Meters, progress: Optional[Dict[str, Any]],
                 rng_after: Optional[Dict[str, Any]], reused_by: Optional[ResumePlan] = None) -> None:
        self.parts, self.meters, self.context = parts, meters, parts.context
        self.n_batches: Optional[int] = None  # set by start(), once on_train_loader_start has run
        self.progress, self.rng_after = progress, rng_after
        self.reused_by = reused_by  # a resumed epoch after the first: the original had its loader iterator already
        self.resumed_at = progress["batches"] if progress else 0
        self.done: Optional[int] = self.resumed_at  # batches whose work is in the weights; None mid-update
        self.in_batch = False
        self.epoch_rng: Optional[Dict[str, Any]] = None
        self.started = time.perf_counter() - (progress["seconds"] if progress else 0.0)
        # the last validation inside this epoch's pass (val_check_interval): the epoch's history entry shows it
        self.valid: Dict[str, Any] = dict(progress.get("valid") or {}) if progress else {}
        self._owned = parts.context.owned_fields()

    def start(self, n_batches: Optional[int]) -> None:
        """After on_train_loader_start: the pass's batch count; for a resumed epoch, the checkpoint's lrs (an
        epoch-start schedule just ran again, but the lr is the checkpoint's)."""
        self.n_batches = n_batches
        if self.progress is not None:
            self.parts.optimizers.set_lrs(self.progress["lrs"])

    def batches(self) -> Iterator[Tuple[int, Any, bool]]:
        """The epoch's ``(batch_idx, batch, is_last)``, its loader iterator created from a recorded RNG state. A
        resumed epoch re-creates the iterator from the checkpoint's epoch RNG state, draws and drops the batches
        already trained (loaded, not trained), then continues from the checkpoint's RNG state, loss items and
        gradients."""
        progress, context = self.progress, self.parts.context
        if progress is not None:
            set_rng_state(progress["epoch_rng_state"])
        if self.reused_by is not None:
            iterate_as_before(context.train_loader, self.reused_by)
        self.epoch_rng = get_rng_state()
        batches = numbered(context.train_loader, self.n_batches, self.parts.params.max_train_batches)
        if progress is None:
            return batches
        for _ in range(progress["batches"]):
            next(batches)
        set_rng_state(self.rng_after)
        items = progress["loss_items"]
        self.meters.train_loss.load(items.to(context.device) if items is not None else None)
        load_metric_states(self.meters.collections["train"], progress.get("metric_states"), context.device)
        grads = progress.get("grads") or {}
        for name, param in self.parts.net.named_parameters():
            if name in grads:
                param.grad = _as_param(grads[name].to(param.device), param)
        return batches

    def begin(self, batch_idx: int) -> None:
        self.in_batch = True
        self._owned["batch_idx"] = batch_idx

    def updating(self) -> None:
        """Backward starts: until the batch ends, gradients and weights are mid-update (no checkpoint there)."""
        self.done = None

    def end(self, batch_idx: int) -> None:
        self.done, self.in_batch = batch_idx + 1, False
        self.context.batches_seen += 1

    def seconds(self) -> float:
        return time.perf_counter() - self.started

    def record(self) -> Dict[str, Any]:
        """The ``epoch_progress`` record of a mid-epoch checkpoint taken after ``done`` batches (SPEC §7)."""
        net = self.parts.net
        # the writer copies; FSDP2 gradient shards are gathered (a collective: every rank records)
        grads = {name: _full(p.grad) for name, p in net.named_parameters() if p.grad is not None}
        return {
            "batches": self.done,
            "epoch_start_step": self.parts.context.epoch_start_step,
            "epoch_rng_state": self.epoch_rng,
            "loss_items": self.meters.train_loss.stacked(),
            "metric_states": metric_states(self.meters.collections["train"]),  # the train metrics so far
            "grads": grads or None,  # an accumulation window cut by Ctrl-C continues where it was
            "seconds": self.seconds(),
            "lrs": self.parts.optimizers.lrs(),
            "valid": dict(self.valid),
        }

    def own_part(self, record: Dict[str, Any]) -> Dict[str, Any]:
        """What of ``record`` is this rank's own under torchrun (the rest is the same on every rank): gathered
        into the record's ``ranks`` list, one entry per rank, and taken back by each rank on resume. FSDP2's
        gradients are reduced every micro-batch, so the gathered ones are the same everywhere: kept once."""
        keys = [key for key in PER_RANK if key != "grads" or not is_fsdp2(self.parts.net)]
        return dict({key: record[key] for key in keys}, rng_state=get_rng_state())

    def lrs(self) -> List[float]:
        return self.parts.optimizers.lrs()


#: the parts of a mid-epoch record that differ between ranks: a cut accumulation window's gradients, the epoch's
#: loss items and train metric states so far, the RNG state (the current one is stored as ``rng_state``).
PER_RANK = ("grads", "loss_items", "metric_states", "epoch_rng_state")


def own_share(state: Dict[str, Any], path: Path) -> Tuple[Optional[Dict[str, Any]], Dict[str, Any]]:
    """(epoch_progress, rng_state) of ``state`` for this rank: a record written under torchrun holds every
    rank's own part, which only the same number of ranks can take back."""
    progress, rng = state.get("epoch_progress"), state["rng_state"]
    ranks = (progress or {}).get("ranks")
    if not ranks:
        return progress, rng
    if len(ranks) != distributed.world_size():
        raise CheckpointError(f"{path} was written in the middle of an epoch by {len(ranks)} ranks, each with its own "
                              f"part of the epoch; resume it with {len(ranks)} ranks (now "
                              f"{distributed.world_size()}), or from a checkpoint written at an epoch's end")
    own = ranks[distributed.rank()]
    return dict(progress, **{key: own[key] for key in PER_RANK if key in own}), own["rng_state"]


def check_same_checkpoint(state: Optional[Dict[str, Any]], path: Optional[Path],
                          failed: Optional[BaseException] = None) -> None:
    """Under torchrun, before anything is restored: every rank read the same checkpoint (the same epoch, step,
    batch and world size), or none; else one CheckpointError on every rank naming what each read (a run dir
    that is not shared between nodes, or a copy that lags). A rank that could not read it (``failed``) fails
    every rank, instead of leaving the others waiting at the first collective."""
    if not distributed.is_distributed():
        return
    mine = None if state is None else (int(state["epoch"]), int(state.get("global_step", 0)),
                                       (state.get("epoch_progress") or {}).get("batches"), state.get("world_size"))
    read = distributed.all_gather((mine, str(path) if path else None, str(failed) if failed else None))
    if len({key for key, _, _ in read}) > 1 or any(error for _, _, error in read):
        each = "; ".join(f"rank {r}: " + (error if error else "no checkpoint" if key is None else
                                          f"{where} (epoch {key[0]}, step {key[1]}, batch {key[2]}, written by "
                                          f"{key[3]} ranks)") for r, (key, where, error) in enumerate(read))
        raise CheckpointError("resume: the ranks read different checkpoints (" + each + "); every rank must read "
                              "the same file: put the run dir on storage every node shares, or pass the same "
                              "resume_path to all")


def _full(tensor: torch.Tensor) -> torch.Tensor:
    """A DTensor's full value (a collective), or the tensor."""
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


def _as_param(full: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """``full`` laid out as ``param``: this rank's shard of it for a DTensor parameter (rank 0's value is
    scattered, a collective), else ``full`` itself."""
    if not hasattr(param, "device_mesh"):
        return full
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(full, param.device_mesh, param.placements)


def iterate_as_before(loader: Any, plan: ResumePlan) -> None:
    """Give a persistent-workers DataLoader that has no iterator yet the one the uninterrupted run had: created
    now from a throwaway RNG state, so the caller's next ``iter(loader)`` only resets it (drawing the sampler's
    seed, not a new base seed first). Its workers' own RNG cannot be restored: warned once per resume."""
    persistent = getattr(loader, "persistent_workers", False) and getattr(loader, "num_workers", 0) > 0
    if not persistent or getattr(loader, "_iterator", True) is not None:
        return
    state = torch.random.get_rng_state()
    iter(loader)  # starts the workers; draws the base seed and the sampler's first seed
    torch.random.set_rng_state(state)
    if not plan.warned_workers:
        plan.warned_workers = True
        warnings.warn("resume with persistent_workers=True: the loader draws the same batches as the uninterrupted "
                      "run, but random numbers drawn inside its worker processes (random augmentations in the "
                      "dataset) cannot be restored and differ from the uninterrupted run's", stacklevel=4)


#: training_params a resume cannot apply: the state restored from the checkpoint keeps the old value.
KEPT_BY_CHECKPOINT = {
    "initial_lr": "the restored optimizer's param groups keep their lr0",
    "optimizer": "the checkpoint's optimizer state is restored",
    "optimizer_params": "the restored optimizer state keeps its hyperparameters",
    "zero_weight_decay_on_bias_and_bn": "the restored optimizer's param groups keep their weight decay",
    "seed": "the RNG state is restored",
}
#: keys that say how to resume: they differ from the checkpoint's run by nature.
_RESUME_KEYS = ("resume", "resume_path", "resume_weights_only", "run_id")  # they choose what is resumed


def plain_params(params: Mapping[str, Any]) -> Dict[str, Any]:
    """The resolved training_params as plain values, stored in every checkpoint (weights_only-loadable and
    comparable between processes): numbers, strings, lists and dicts as they are, other objects as ``<TypeName>``
    (a class or function as ``<its name>``)."""
    return {str(key): _plain(value) for key, value in params.items()}


def _plain(value: Any) -> Any:
    return plain_value(value, _type_name)


def _type_name(value: Any) -> str:
    name = getattr(value, "__name__", None)  # a class or function
    return f"<{name if isinstance(name, str) else type(value).__name__}>"


def warn_changed_params(saved: Optional[Mapping[str, Any]], params: Mapping[str, Any], path: Path) -> None:
    """One warning listing every training_params key whose value differs from the checkpoint's run, split into
    those that take effect and those the restored state overrides (a checkpoint without params: nothing)."""
    if not saved:
        return
    now = plain_params(params)
    changed = [key for key in now if key in saved and key not in _RESUME_KEYS and now[key] != saved[key]]
    if not changed:
        return
    kept = [key for key in changed if key in KEPT_BY_CHECKPOINT or (key == "lr_mode" and (
        isinstance(now[key], dict) or isinstance(saved[key], dict)))]  # a torch scheduler: its state is restored
    applied = [key for key in changed if key not in kept]
    parts = []
    if applied:
        parts.append("take effect: " + ", ".join(f"{key} {_short(saved[key])} -> {_short(now[key])}" for key in applied))
    if kept:
        why = "; ".join(sorted({KEPT_BY_CHECKPOINT.get(key, "the restored scheduler state keeps its settings")
                                for key in kept}))
        parts.append("do NOT take effect (" + why + "): " +
                     ", ".join(f"{key} {_short(saved[key])} -> {_short(now[key])}" for key in kept))
    message = f"resume: training_params differ from the run that wrote {path}; " + "; ".join(parts)
    warnings.warn(message, stacklevel=4)  # SPEC §8: every differing key, also max_epochs raised to extend a run


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."
