"""Exponential moving average of model weights (SPEC §4), matching SuperGradients 3.7's ModelEMA.

After every optimizer step: ``ema = d·ema + (1−d)·param`` for each floating-point tensor of the state_dict
(parameters and float buffers; integer buffers are left as they are), where ``d`` depends on ``decay_type``:

- ``constant``: d = decay
- ``threshold``: d = min(decay, (1 + step) / (10 + step))
- ``exp``: d = decay·(1 − exp(−beta·step/total_steps))

``step`` is the number of optimizer steps taken including this one; ``total_steps`` is optimizer steps
per epoch × max_epochs.

``start_step`` and ``interval`` (mmedit's ``start_iter`` / ``interval``): while ``step <= start_step`` the EMA
copies the weights instead of averaging them; after that it averages on every ``interval``-th step counted
from ``start_step`` (steps with ``(step − start_step) % interval == 0``). Defaults 0 and 1: every step.
"""
from __future__ import annotations

import copy
import math
from typing import Any, Callable, Dict, List, Mapping

import torch
import torch.nn as nn

from .modules import unwrap_model

__all__ = ["ModelEMA", "DECAY_TYPES"]


def _constant(decay: float, step: int, total_steps: int, beta: float) -> float:
    return decay


def _threshold(decay: float, step: int, total_steps: int, beta: float) -> float:
    return min(decay, (1 + step) / (10 + step))


def _exp(decay: float, step: int, total_steps: int, beta: float) -> float:
    return decay * (1 - math.exp(-beta * step / max(1, total_steps)))


DECAY_TYPES: Dict[str, Callable[[float, int, int, float], float]] = {
    "constant": _constant,
    "threshold": _threshold,
    "exp": _exp,
}


class ModelEMA:
    """Holds ``ema``, an eval-mode copy of the model whose weights are the moving average."""

    def __init__(self, model: nn.Module, decay: float = 0.9999, decay_type: str = "exp", beta: float = 15.0,
                 start_step: int = 0, interval: int = 1) -> None:
        if decay_type not in DECAY_TYPES:
            raise ValueError(f"training_params.ema_params.decay_type: unknown {decay_type!r}; valid: {list(DECAY_TYPES)}")
        if not 0.0 <= float(decay) <= 1.0:
            raise ValueError(f"training_params.ema_params.decay must be in [0, 1], got {decay!r}")
        for name, value, low in (("start_step", start_step, 0), ("interval", interval, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"training_params.ema_params.{name} must be an int >= {low}, got {value!r}")
        self.start_step = start_step
        self.interval = interval
        self.decay = float(decay)
        self.decay_type = decay_type
        self.beta = float(beta)
        self._decay_fn = DECAY_TYPES[decay_type]
        self.ema = copy.deepcopy(unwrap_model(model)).eval()
        for param in self.ema.parameters():
            param.requires_grad_(False)
        self._pairs_for: Any = None
        self._ema_floats: List[torch.Tensor] = []
        self._source_floats: List[torch.Tensor] = []

    def _bind(self, model: nn.Module) -> None:
        # state_dict() builds a dict each call; the tensors it returns are the live storage, so collect once.
        source = unwrap_model(model).state_dict(keep_vars=False)
        target = self.ema.state_dict(keep_vars=False)
        pairs = [(target[k], source[k]) for k in target if target[k].dtype.is_floating_point]
        self._ema_floats = [e for e, _ in pairs]
        self._source_floats = [s for _, s in pairs]
        self._pairs_for = model

    @torch.no_grad()
    def update(self, model: nn.Module, step: int, total_steps: int) -> None:
        """Blend the current weights of ``model`` into ``ema``."""
        if self._pairs_for is not model:
            self._bind(model)
        decay = self._decay_fn(self.decay, step, total_steps, self.beta)
        torch._foreach_mul_(self._ema_floats, decay)
        torch._foreach_add_(self._ema_floats, self._source_floats, alpha=1.0 - decay)

    def step(self, model: nn.Module, step: int, total_steps: int) -> None:
        """What happens after optimizer step ``step`` (1-based): copy while ``step <= start_step``, then
        :meth:`update` every ``interval`` steps."""
        if step <= self.start_step:
            self.copy_from(model)
        elif (step - self.start_step) % self.interval == 0:
            self.update(model, step, total_steps)

    @torch.no_grad()
    def copy_from(self, model: nn.Module) -> None:
        """Set the EMA's float tensors to the model's."""
        if self._pairs_for is not model:
            self._bind(model)
        for ema, source in zip(self._ema_floats, self._source_floats):
            ema.copy_(source)

    def state_dict(self) -> Dict[str, Any]:
        return self.ema.state_dict()

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.ema.load_state_dict(state)
        self._pairs_for = None  # storage may have been replaced
