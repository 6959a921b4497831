"""Optimizers that torch.optim lacks, registered by name: ``RMSpropTF`` (SuperGradients' / TensorFlow's RMSprop).

Also the per-optimizer ``optimizer_params`` defaults SuperGradients 3.7 applies when a recipe omits them
(SPEC §7); ``building.build_optimizer`` merges them under the recipe's own values.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, Iterable, Optional, Union

import torch

from .registry import OPTIMIZERS

__all__ = ["RMSpropTF", "SG_OPTIMIZER_DEFAULTS", "sg_optimizer_defaults"]


@OPTIMIZERS.register
class RMSpropTF(torch.optim.Optimizer):
    """RMSprop as TensorFlow (and SuperGradients' ``RMSpropTF``) computes it. Per parameter, with gradient g:

    - g ← g + weight_decay·p (or, with ``decoupled_decay``, p ← p·(1 − weight_decay) first)
    - v ← v + (1 − alpha)·(g² − v), with v starting at **ones** (torch's RMSprop starts at zeros)
    - centered: m ← m + (1 − alpha)·(g − m), d = sqrt(v − m² + eps); else d = sqrt(v + eps) (eps inside the sqrt)
    - momentum > 0: b ← momentum·b + lr·g/d, p ← p − b (lr inside the buffer, ``lr_in_momentum=True``), or
      b ← momentum·b + g/d, p ← p − lr·b; without momentum p ← p − lr·g/d.
    """

    def __init__(self, params: Union[Iterable[torch.Tensor], Iterable[Dict[str, Any]]], lr: float = 1e-2,
                 alpha: float = 0.9, eps: float = 1e-10, weight_decay: float = 0.0, momentum: float = 0.0,
                 centered: bool = False, decoupled_decay: bool = False, lr_in_momentum: bool = True) -> None:
        for name, value in (("lr", lr), ("alpha", alpha), ("eps", eps), ("weight_decay", weight_decay),
                            ("momentum", momentum)):
            if value < 0.0:
                raise ValueError(f"RMSpropTF: {name} must be >= 0, got {value!r}")
        defaults = dict(lr=lr, alpha=alpha, eps=eps, weight_decay=weight_decay, momentum=momentum, centered=centered,
                        decoupled_decay=decoupled_decay, lr_in_momentum=lr_in_momentum)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], Any]] = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, alpha, eps = group["lr"], group["alpha"], group["eps"]
            decay, momentum = group["weight_decay"], group["momentum"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad
                if grad.is_sparse:
                    raise RuntimeError("RMSpropTF does not support sparse gradients")
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["square_avg"] = torch.ones_like(p)
                    if momentum > 0:
                        state["momentum_buffer"] = torch.zeros_like(p)
                    if group["centered"]:
                        state["grad_avg"] = torch.zeros_like(p)
                state["step"] += 1
                if decay != 0:
                    if group["decoupled_decay"]:
                        p.mul_(1.0 - decay)
                    else:
                        grad = grad + decay * p
                square_avg = state["square_avg"]
                square_avg.add_((grad * grad - square_avg) * (1.0 - alpha))
                if group["centered"]:
                    grad_avg = state["grad_avg"]
                    grad_avg.add_((grad - grad_avg) * (1.0 - alpha))
                    denom = (square_avg - grad_avg * grad_avg + eps).sqrt()
                else:
                    denom = (square_avg + eps).sqrt()
                if momentum > 0:
                    buf = state["momentum_buffer"]
                    buf.mul_(momentum)
                    if group["lr_in_momentum"]:
                        buf.addcdiv_(grad, denom, value=lr)
                        p.sub_(buf)
                    else:
                        buf.addcdiv_(grad, denom)
                        p.sub_(buf * lr)
                else:
                    p.addcdiv_(grad, denom, value=-lr)
        return loss


#: SuperGradients 3.7's optimizer_params defaults by optimizer class (training/params.py there): used for the
#: keys a recipe does not give. Other optimizers (AdamW, ...) get no defaults, as in SG.
SG_OPTIMIZER_DEFAULTS: Dict[type, Dict[str, Any]] = {
    torch.optim.SGD: {"weight_decay": 1e-4, "momentum": 0.9},
    torch.optim.Adam: {"weight_decay": 1e-4},
    torch.optim.RMSprop: {"weight_decay": 1e-4, "momentum": 0.9},
    RMSpropTF: {"weight_decay": 1e-4, "momentum": 0.9},
}


def sg_optimizer_defaults(optimizer_cls: Any) -> Dict[str, Any]:
    """The defaults SG gives ``optimizer_cls`` (exact class, as SG matches it), or {}."""
    return dict(SG_OPTIMIZER_DEFAULTS.get(optimizer_cls, {}))
