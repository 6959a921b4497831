"""Log the total gradient norm before clipping."""
from __future__ import annotations

from typing import List, Optional

import torch

from ..fsdp import global_grad_norm
from .base import Callback, PhaseContext, Priority

__all__ = ["GradientNormLogger", "total_grad_norm"]


def total_grad_norm(parameters: List[torch.nn.Parameter], norm_type: float = 2.0) -> torch.Tensor:
    """The norm of all gradients taken together (as ``clip_grad_norm_`` computes it); 0 when none. Sharded (FSDP2,
    DTensor) gradients: the norm over every rank's shards (a collective; every rank logs alike)."""
    return global_grad_norm(parameters, norm_type)


class GradientNormLogger(Callback):
    """Logs the total gradient norm as ``Step/Train/grad_norm`` through ``context.sg_logger``.

    Fires at on_train_batch_gradient_step_start every ``log_interval`` optimizer steps (default: the run's
    ``training_params.log_interval``), with the number of the step about to be taken (``global_step + 1``)
    as the step. It runs at HIGH priority, before ``GradientClipping`` (LOW), so the value is the norm
    before clipping; with mixed precision the trainer has unscaled the gradients already. Reading the value
    costs one host-device sync per logged step. ``last_norm`` holds the last value logged.
    """

    priority = Priority.HIGH

    def __init__(self, log_interval: Optional[int] = None, norm_type: float = 2.0,
                 tag: str = "Step/Train/grad_norm") -> None:
        if log_interval is not None and (isinstance(log_interval, bool) or not isinstance(log_interval, int)
                                         or log_interval < 1):
            raise ValueError(f"GradientNormLogger log_interval must be an int >= 1 or None, got {log_interval!r}")
        self.log_interval = log_interval
        self.norm_type = float(norm_type)
        self.tag = tag
        self.last_norm: Optional[float] = None
        self._params: Optional[List[torch.nn.Parameter]] = None

    def on_training_start(self, context: PhaseContext) -> None:
        if self.log_interval is None:
            self.log_interval = int((context.training_params or {}).get("log_interval", 50))
        self._params = list(context.net.parameters())  # all: a stage switch may unfreeze some later

    def on_train_batch_gradient_step_start(self, context: PhaseContext) -> None:
        step = context.global_step + 1
        if step % self.log_interval:
            return
        params = self._params if self._params is not None else list(context.net.parameters())
        self.last_norm = float(total_grad_norm(params, self.norm_type))
        if context.sg_logger is not None:
            context.sg_logger.add_scalar(self.tag, self.last_norm, step)
