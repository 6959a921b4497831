"""The work of one train batch: forward and loss, backward, and the optimizer step, with gradient accumulation,
mixed precision, DDP's ``no_sync`` and closure optimizers. The events around this work are fired by ``fit.py``.

Accumulation (SPEC §1): the optimizer steps on every ``batch_accumulate``-th batch of the epoch and on its last
batch; windows never span epochs, and each micro-batch loss is scaled by 1/(its window's size), so accumulation
equals one big batch.
"""
from __future__ import annotations

import contextlib
from typing import Any, List, Optional, Tuple

import torch

from ..batches import rescale_grads, window_size
from ..context import PhaseContext
from ..optimizers import step_takes_closure
from .parts import Meters, RunParts

__all__ = ["TrainStep"]


class TrainStep:
    """Forward, backward and optimizer step of one micro-batch; ``start_epoch`` sets the epoch's batch count."""

    def __init__(self, parts: RunParts, meters: Meters) -> None:
        self.parts = parts
        self.meters = meters
        self.optimizer = parts.optimizer
        self.accumulate = int(parts.params.batch_accumulate)
        self.with_closure = step_takes_closure(parts.optimizer)
        self.n_batches: Optional[int] = None  # batches in the running epoch; None when the loader has no len()
        # DDP decides at forward time whether the backward all-reduces: a micro-batch that does not step runs its
        # forward inside no_sync(), so the all-reduce happens once per window, on the stepping micro-batch.
        self._local = _LocalAccumulation(parts) if parts.distributed and self.accumulate > 1 else None

    def start_epoch(self, n_batches: Optional[int]) -> None:
        self.n_batches = n_batches

    def is_stepping(self, batch_idx: int, is_last: bool) -> bool:
        """The optimizer steps after this micro-batch: the window's last, or the epoch's last batch."""
        return is_last or (batch_idx + 1) % self.accumulate == 0

    def forward_loss(self, context: PhaseContext, stepping: bool) -> None:
        """context.preds = model(inputs); context.loss, context.loss_log_items = the criterion's."""
        with self.parts.autocast if stepping or self._local is None else self._local:
            context.preds = self.parts.model(context.inputs)
            context.loss, context.loss_log_items = self.meters.compute_loss(context.criterion, context.preds,
                                                                            context.target)

    def backward(self, context: PhaseContext, batch_idx: int) -> None:
        """loss.backward(), scaled by 1/window (accumulation) and by the AMP scaler."""
        window = window_size(batch_idx, self.n_batches, self.accumulate)
        loss = context.loss if window == 1 else context.loss / window
        if self.parts.scaler is not None:
            loss = self.parts.scaler.scale(loss)
        loss.backward()

    def unscale(self, batch_idx: int, is_last: bool) -> None:
        """Gradients in true units before on_train_batch_gradient_step_start: the AMP scale removed, and a short
        last window of a loader without len() (scaled by 1/batch_accumulate) corrected."""
        if self.parts.scaler is not None:
            self.parts.scaler.unscale_(self.optimizer)
        if is_last and self.n_batches is None and (batch_idx + 1) % self.accumulate:
            rescale_grads(self.parts.net, self.accumulate / ((batch_idx % self.accumulate) + 1))

    def step(self, context: PhaseContext) -> bool:
        """optimizer.step, zero_grad, global_step += 1; False (no step) after a stop or ``skip_step``."""
        optimizer, scaler = self.optimizer, self.parts.scaler
        if context.stop_training:
            return False
        if context.skip_step:
            context.skip_step = False
            optimizer.zero_grad(set_to_none=True)
            if scaler is not None:
                scaler.update()  # ends this step's unscale_ bookkeeping
            return False
        if self.with_closure:
            optimizer.step(_StepClosure(self, context))
        elif scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        context.global_step += 1
        return True

    def drop_window(self) -> None:
        """Forget the gradients of an accumulation window a stop cut short."""
        self.optimizer.zero_grad(set_to_none=True)


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
            preds = parts.model(context.inputs)
            loss, _ = self.step.meters.compute_loss(context.criterion, preds, context.target)
        loss.backward()
        self.loss, self.versions, self.fingerprint = loss.detach(), versions, fingerprint
        return self.loss
