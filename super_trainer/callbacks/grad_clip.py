"""Gradient-norm clipping before each optimizer step."""
from __future__ import annotations

import torch

from .base import Callback, PhaseContext, Priority

__all__ = ["GradientClipping"]


class GradientClipping(Callback):
    """Clips the total gradient norm to ``max_norm`` at on_train_batch_gradient_step_start.

    The trainer unscales AMP gradients before that event, so ``max_norm`` is in true gradient units.
    Runs at LOW priority: callbacks that inspect raw gradients at NORMAL see them before clipping.
    """

    priority = Priority.LOW

    def __init__(self, max_norm: float, norm_type: float = 2.0) -> None:
        self.max_norm = float(max_norm)
        self.norm_type = float(norm_type)
        self._params = None

    def on_train_batch_gradient_step_start(self, context: PhaseContext) -> None:
        if self._params is None:
            self._params = [p for p in context.net.parameters() if p.requires_grad]
        torch.nn.utils.clip_grad_norm_(self._params, self.max_norm, norm_type=self.norm_type)
