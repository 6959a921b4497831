"""The work of one train batch: forward and loss (or the user's ``train_step``), backward, and the optimizer step,
with gradient accumulation, mixed precision, DDP and closure optimizers. The events around this work are fired by
``fit.py`` (``train_epoch`` and ``update_weights``).

Accumulation (SPEC §1): the optimizer steps on every ``batch_accumulate``-th batch of the epoch and on its last
batch; windows never span epochs, and each micro-batch loss is scaled by 1/(its window's size), so accumulation
equals one big batch.

Custom steps (SPEC §8): a ``train_step(context)`` runs under the trainer's autocast and returns the loss(es); the
trainer then updates the one optimizer, unless the step updated through ``context.optimizers[name].update(loss)``
itself (always, with several optimizers). Under torchrun such a run is not wrapped in DistributedDataParallel: the
gradients are averaged here on the stepping micro-batch (:class:`~.optimizers.GradientSync`).
"""
from __future__ import annotations

import contextlib
import warnings
import weakref
from typing import Any, Callable, List, Optional, Tuple

import torch

from ..batches import call_model, rescale_grads, window_size
from ..context import PhaseContext
from ..fsdp import is_fsdp2
from ..optimizers import step_takes_closure
from .optimizers import GradientSync, OptimizerHandle
from .parts import Meters, RunParts

__all__ = ["TrainStep"]


class TrainStep:
    """Forward, backward and optimizer step of one micro-batch. ``start_epoch`` sets the epoch's batch count and
    accumulation, ``begin`` the running batch."""

    def __init__(self, parts: RunParts, meters: Meters, update: Callable[[OptimizerHandle, Any], None]) -> None:
        self.parts = parts
        self.meters = meters
        self.optimizers = parts.optimizers
        self.first = parts.optimizers.first  # the optimizer the trainer updates by itself
        self.custom = parts.train_step  # None: forward + criterion
        # the loop's update with its events, run by context.optimizers[name].update(loss); held weakly: the loop
        # owns this step, and a reference back would be a cycle that keeps a finished run's model, optimizer state
        # and loss tensors alive until the garbage collector runs
        self._update = weakref.WeakMethod(update)
        self.accumulate = int(parts.params.batch_accumulate)
        self.with_closure = step_takes_closure(parts.optimizer)
        self.n_batches: Optional[int] = None  # batches in the running epoch; None when the loader has no len()
        self.batch_idx, self.is_last, self.stepping = 0, False, True
        self.counted = False  # global_step already counts the running batch
        self.in_custom = False  # the user's train_step is running (it may update through context.optimizers)
        self.updated = False  # the running batch's train_step updated through context.optimizers
        # the trainer runs the batch's update itself: no train_step, or one that did not update through
        # context.optimizers (with several optimizers the step always updates them itself); an attribute, not a
        # property: the loop reads it every batch
        self.one_optimizer = not parts.optimizers.several
        self.trainer_updates = self.one_optimizer
        self.unscaled = False  # the GradScaler unscaled gradients inside the train_step (updated after it)
        self.bare = False  # forward without entering a context manager (set per epoch)
        self.unscaling = True  # unscale() has work: averaging (train_step under torchrun), AMP, a short window
        self.sync = GradientSync(parts.net) if parts.distributed and self.custom is not None else None
        self._local: Any = None  # autocast plus DDP's no_sync() for micro-batches that do not step
        self.autocasting = isinstance(parts.autocast, torch.autocast)
        self._no_autocast = torch.autocast(parts.context.device.type, enabled=False) if self.autocasting \
            else contextlib.nullcontext()

    def start_epoch(self, n_batches: Optional[int], accumulate: int) -> None:
        self.n_batches, self.accumulate = n_batches, accumulate
        self.unscaling = self.sync is not None or self.parts.scaler is not None or n_batches is None
        # DDP decides at forward time whether the backward all-reduces: a micro-batch that does not step runs its
        # forward inside no_sync(), so the all-reduce happens once per window, on the stepping micro-batch. FSDP2
        # reduce-scatters every micro-batch instead: its gradients stay sharded (parallel.gradient_sync says why).
        if self._local is None and accumulate > 1 and self.parts.distributed and self.sync is None \
                and not is_fsdp2(self.parts.net):
            self._local = _LocalAccumulation(self.parts)
        self.bare = not self.autocasting and self._local is None

    def begin(self, batch_idx: int, is_last: bool) -> None:
        """A new micro-batch: the optimizer steps after it when it is its window's last, or the epoch's last."""
        self.batch_idx, self.is_last = batch_idx, is_last
        self.stepping = is_last or (batch_idx + 1) % self.accumulate == 0
        self.counted = self.updated = False
        self.trainer_updates = self.one_optimizer
        if self.sync is not None:
            self.sync.broadcast_buffers()

    # ---- forward and loss ------------------------------------------------------------------------------
    def forward_loss(self, context: PhaseContext) -> None:
        """context.preds = model(inputs) and context.loss, context.loss_log_items = the criterion's; or the
        train_step's loss(es) (its updates through context.optimizers run meanwhile)."""
        if self.custom is not None:
            return self.run_custom(context)
        if self.bare:  # no autocast, no DDP no_sync(): no context manager to enter (the common CPU path)
            return self._forward_loss(context)
        with self.parts.autocast if self.stepping or self._local is None else self._local:
            self._forward_loss(context)

    def _forward_loss(self, context: PhaseContext) -> None:
        model, inputs = self.parts.model, context.inputs
        context.preds = model(inputs) if type(inputs) is torch.Tensor else call_model(model, inputs)
        context.loss, context.loss_log_items = self.meters.compute_loss(context.criterion, context.preds,
                                                                        context.target)

    def stop_can_change(self) -> bool:
        """Whether anything between a batch's start and its backward can set stop_training: a train_step or a
        listener of on_train_batch_start / on_train_batch_loss_end (under DDP the ranks agree again only then)."""
        fire = self.parts.callbacks
        return self.custom is not None or bool(
            fire.receivers("on_train_batch_start") or fire.receivers("on_train_batch_loss_end"))

    def run_custom(self, context: PhaseContext) -> None:
        context.preds = None
        self.in_custom, self.unscaled = True, False
        self.optimizers.bind(self._update())
        try:
            with self.parts.autocast:
                out = self.custom(context)
        finally:
            self.optimizers.bind(None)
            self.in_custom = False
        if self.unscaled:  # once per batch, after every optimizer of the window stepped (torch's AMP recipe)
            self.parts.scaler.update()
        context.loss, context.loss_log_items = self.meters.read_step(out, context.criterion)

    def own_loss(self, context: PhaseContext, handle: OptimizerHandle, loss: Any) -> None:
        """Before the events of ``context.optimizers[name].update(loss)``: the update's loss on the context."""
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
            raise ValueError(f"context.optimizers[{handle.name!r}].update(loss): loss must be a scalar tensor, got "
                             f"{type(loss).__name__}{tuple(loss.shape) if isinstance(loss, torch.Tensor) else ''}")
        self.updated, self.trainer_updates = True, False
        context.optimizer_name = handle.name
        context.loss, context.loss_log_items = loss, loss.detach()

    # ---- backward and step -----------------------------------------------------------------------------
    def backward(self, context: PhaseContext, handle: OptimizerHandle) -> None:
        """loss.backward(), scaled by 1/window (accumulation) and by the AMP scaler; with several optimizers only
        into ``handle``'s parameters, so one optimizer's loss never adds to another's gradients."""
        window = 1 if self.accumulate == 1 else window_size(self.batch_idx, self.n_batches, self.accumulate)
        loss = context.loss if window == 1 else context.loss / window
        if self.parts.scaler is not None:
            loss = self.parts.scaler.scale(loss)
        if not self.in_custom:
            loss.backward()
            return
        with self._no_autocast:  # backward runs outside autocast (a train_step's update runs inside it)
            loss.backward(inputs=handle.parameters()) if handle.restricted else loss.backward()

    def unscale(self, handle: OptimizerHandle) -> None:
        """Gradients in true units before on_train_batch_gradient_step_start: averaged over the ranks (a
        train_step under torchrun), the AMP scale removed, and a short last window of a loader without len()
        (scaled by 1/batch_accumulate) corrected."""
        if not self.unscaling:  # nothing to do: one check per step on the common path
            return
        params = handle.parameters() if self.sync is not None or self.n_batches is None else []
        if self.sync is not None:
            self.sync.average(params)
        if self.parts.scaler is not None:
            self.parts.scaler.unscale_(handle.optimizer)
            self.unscaled = self.in_custom
        if self.is_last and self.n_batches is None and (self.batch_idx + 1) % self.accumulate:
            rescale_grads(params, self.accumulate / ((self.batch_idx % self.accumulate) + 1))

    def step(self, context: PhaseContext, handle: OptimizerHandle) -> bool:
        """optimizer.step, zero_grad, and global_step += 1 at the batch's first update; False (no step) after a
        stop or ``skip_step``."""
        optimizer, scaler = handle.optimizer, self.parts.scaler
        if context.stop_training:
            return False
        if context.skip_step:
            context.skip_step = False
            handle.clear_grads()
            if scaler is not None and not self.in_custom:
                scaler.update()  # ends this step's unscale_ bookkeeping
            return False
        if self.with_closure:
            optimizer.step(_StepClosure(self, context))
        elif scaler is not None:
            scaler.step(optimizer)
            if not self.in_custom:
                scaler.update()
        else:
            optimizer.step()
        handle.clear_grads()
        if self.in_custom and self.autocasting:
            # autocast caches its low-precision copies of the weights until the outermost autocast exits, and a
            # train_step runs all its updates inside one: the next forward must not see the old weights
            torch.clear_autocast_cache()
        if not self.counted:  # global_step counts train batches that made at least one update
            context.global_step += 1
            self.counted = True
        return True

    def end_pass(self, complete: bool) -> None:
        """At the pass's end, no gradient leaks into the next pass: those of an accumulation window a stop cut
        short are dropped, and so are those of a last window that never stepped because the loader yielded fewer
        batches than its len() said (with a warning)."""
        if complete and (self.is_last or self.stepping):
            return
        if complete:
            warnings.warn(f"the train loader ended after {self.batch_idx + 1} batches, but its len() said "
                          f"{self.n_batches}: the gradients of its last, unfinished accumulation window are dropped",
                          stacklevel=3)
        for handle in self.optimizers:
            handle.clear_grads()


class _LocalAccumulation:
    """Autocast plus DDP's ``no_sync()`` for a micro-batch that does not step."""

    def __init__(self, parts: RunParts) -> None:
        self.parts = parts
        self.stack = contextlib.ExitStack()

    def __enter__(self) -> None:
        self.stack.enter_context(self.parts.model.no_sync())
        self.stack.enter_context(self.parts.autocast)

    def __exit__(self, *exc: Any) -> None:
        self.stack.close()


class _StepClosure:
    """The closure passed to ``optimizer.step`` for optimizers that take one (LBFGS, SAM, ...).

    Called while the weights are still those of the batch's backward, it returns the batch's loss without
    recomputing. Once the weights changed (SAM's perturbation, LBFGS's line search) it zeroes the gradients and
    recomputes forward, loss and backward on the current batch under the trainer's autocast. A weight change is
    seen through the parameters' version counters and, for writes through ``.data`` that bypass them, a norm
    fingerprint (one host sync per call; only these optimizers pay it)."""

    def __init__(self, step: TrainStep, context: PhaseContext) -> None:
        self.step, self.context = step, context
        self.params = [p for p in step.parts.net.parameters() if p.requires_grad]
        self.loss = context.loss.detach()
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
        parts, context = self.step.parts, self.context
        parts.optimizer.zero_grad(set_to_none=True)
        with torch.enable_grad(), parts.autocast:
            inputs = context.inputs
            preds = parts.model(inputs) if type(inputs) is torch.Tensor else call_model(parts.model, inputs)
            loss, _ = self.step.meters.compute_loss(context.criterion, preds, context.target)
        loss.backward()
        self.loss, self.versions, self.fingerprint = loss.detach(), versions, fingerprint
        return self.loss
