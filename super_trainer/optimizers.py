"""Optimizers that torch.optim lacks, registered by name: ``RMSpropTF`` (SuperGradients' / TensorFlow's RMSprop) and
``Lamb`` (SuperGradients' Lamb, the NVIDIA FusedLAMB variant).

Also the per-optimizer ``optimizer_params`` defaults SuperGradients 3.7 applies when a recipe omits them
(SPEC §7); ``building.build_optimizer`` merges them under the recipe's own values.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Dict, Iterable, Optional, Tuple, Union

import torch

from .registry import OPTIMIZERS

__all__ = ["RMSpropTF", "Lamb", "SG_OPTIMIZER_DEFAULTS", "sg_optimizer_defaults"]


@OPTIMIZERS.register
class RMSpropTF(torch.optim.Optimizer):
    """RMSprop as TensorFlow (and SuperGradients' ``RMSpropTF``) computes it. Per parameter, with gradient g:

    - g ← g + weight_decay·p (or, with ``decoupled_decay``, p ← p·(1 − weight_decay) first)
    - v ← v + (1 − alpha)·(g² − v), with v starting at **ones** (torch's RMSprop starts at zeros)
    - centered: m ← m + (1 − alpha)·(g − m), d = sqrt(v − m² + eps); else d = sqrt(v + eps) (eps inside the sqrt)
    - momentum > 0: b ← momentum·b + lr·g/d, p ← p − b (lr inside the buffer, ``lr_in_momentum=True``), or
      b ← momentum·b + g/d, p ← p − lr·b; without momentum p ← p − lr·g/d.
    """

    closure_evaluated_first = True  # step() only evaluates a closure before changing the weights, as torch's do

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


@OPTIMIZERS.register
class Lamb(torch.optim.Optimizer):
    """LAMB as SuperGradients 3.7's ``Lamb`` computes it (the NVIDIA FusedLAMB variant). Each step:

    - the gradients of all groups are divided in place by c = max(1, ‖g‖/max_grad_norm), ‖g‖ their global L2 norm
      (``max_grad_norm`` of the constructor: one value for every group);
    - per group, t counts its steps; per parameter, with β3 = 1 − β1 (``grad_averaging``) else 1:
      m ← β1·m + β3·g, v ← β2·v + (1 − β2)·g², u = (m / (1 − β1^t)) / (sqrt(v) / sqrt(1 − β2^t) + eps)
      (no bias correction: both divisors 1);
    - weight_decay w ≠ 0: u ← u + w·p; then (w ≠ 0 or ``always_adapt``) u ← u·r, the trust ratio r = ‖p‖/‖u‖
      (1 when either norm is 0; at most 1 with ``trust_clip``);
    - p ← p − lr·u.
    """

    closure_evaluated_first = True  # step() only evaluates a closure before changing the weights, as torch's do

    def __init__(self, params: Union[Iterable[torch.Tensor], Iterable[Dict[str, Any]]], lr: float = 1e-3,
                 bias_correction: bool = True, betas: Tuple[float, float] = (0.9, 0.999), eps: float = 1e-6,
                 weight_decay: float = 0.01, grad_averaging: bool = True, max_grad_norm: float = 1.0,
                 trust_clip: bool = False, always_adapt: bool = False) -> None:
        for name, value in (("lr", lr), ("eps", eps), ("weight_decay", weight_decay), ("max_grad_norm", max_grad_norm)):
            if value < 0.0:
                raise ValueError(f"Lamb: {name} must be >= 0, got {value!r}")
        if not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"Lamb: betas must be in [0, 1), got {betas!r}")
        defaults = dict(lr=lr, bias_correction=bias_correction, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                        grad_averaging=grad_averaging, max_grad_norm=max_grad_norm, trust_clip=trust_clip,
                        always_adapt=always_adapt)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], Any]] = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        grads = [p.grad for group in self.param_groups for p in group["params"] if p.grad is not None]
        if any(g.is_sparse for g in grads):
            raise RuntimeError("Lamb does not support sparse gradients")
        device = self.param_groups[0]["params"][0].device
        global_norm = torch.stack([g.pow(2).sum() for g in grads]).sum().sqrt() if grads else torch.zeros((), device=device)
        max_norm = float(self.defaults["max_grad_norm"])  # SG reads the constructor's value for every group
        clip = torch.where(global_norm > max_norm, global_norm / max_norm, torch.ones_like(global_norm))
        for group in self.param_groups:
            self._update_group(group, clip)
        return loss

    def _update_group(self, group: Dict[str, Any], clip: torch.Tensor) -> None:
        beta1, beta2 = group["betas"]
        beta3 = 1.0 - beta1 if group["grad_averaging"] else 1.0
        group["step"] = group.get("step", 0) + 1  # one count per group, kept in the group as SG keeps it
        step = group["step"]
        correction1 = 1.0 - beta1 ** step if group["bias_correction"] else 1.0
        correction2 = 1.0 - beta2 ** step if group["bias_correction"] else 1.0
        decay = group["weight_decay"]
        for p in group["params"]:
            if p.grad is None:
                continue
            grad = p.grad.div_(clip)  # in place, as SG's Lamb does
            state = self.state[p]
            if not state:
                state["exp_avg"] = torch.zeros_like(p)
                state["exp_avg_sq"] = torch.zeros_like(p)
            exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
            exp_avg.mul_(beta1).add_(grad, alpha=beta3)
            exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
            update = (exp_avg / correction1).div_((exp_avg_sq.sqrt() / math.sqrt(correction2)).add_(group["eps"]))
            if decay != 0:
                update.add_(p, alpha=decay)
            if decay != 0 or group["always_adapt"]:
                weight_norm, update_norm = p.norm(2.0), update.norm(2.0)
                one = torch.ones_like(weight_norm)
                ratio = torch.where((weight_norm > 0) & (update_norm > 0), weight_norm / update_norm, one)
                if group["trust_clip"]:
                    ratio = torch.minimum(ratio, one)
                update.mul_(ratio)
            p.add_(update, alpha=-group["lr"])


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
