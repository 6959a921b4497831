"""Gradient-norm clipping before each optimizer step."""
from __future__ import annotations

from typing import Dict, List, Optional

import torch

from ..fsdp import clip_grad_norm
from .base import Callback, PhaseContext, Priority

__all__ = ["GradientClipping"]


class GradientClipping(Callback):
    """Clips the total gradient norm to ``max_norm`` at on_train_batch_gradient_step_start.

    The trainer unscales AMP gradients before that event, so ``max_norm`` is in true gradient units.
    Runs at LOW priority: callbacks that inspect raw gradients at NORMAL see them before clipping. With several
    optimizers (SPEC §8) it clips the parameters of the optimizer being updated (``context.optimizer_name``).
    For an FSDP2 model the norm is that of all ranks' shards together, the single-process norm
    (:func:`super_trainer.fsdp.clip_grad_norm`; for plain tensors it is ``clip_grad_norm_`` step for step).
    """

    priority = Priority.LOW

    def __init__(self, max_norm: float, norm_type: float = 2.0) -> None:
        self.max_norm = float(max_norm)
        self.norm_type = float(norm_type)
        self._params: Dict[Optional[str], List[torch.Tensor]] = {}  # by optimizer name (None: the whole model)

    def on_train_batch_gradient_step_start(self, context: PhaseContext) -> None:
        name = getattr(context, "optimizer_name", None)
        params = self._params.get(name)
        if params is None:
            source = context.net.parameters() if name is None else context.optimizers[name].parameters()
            params = self._params[name] = [p for p in source if p.requires_grad]
        clip_grad_norm(params, self.max_norm, norm_type=self.norm_type)
