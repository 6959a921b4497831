"""SAM (Sharpness-Aware Minimization, Foret et al. 2021) as an optimizer that wraps a base optimizer.

``training_params: {optimizer: {SAM: {base: SGD, rho: 0.05, momentum: 0.9}}, initial_lr: 0.1}`` builds it;
every entry other than ``base``, ``rho`` and ``adaptive`` goes to the base optimizer (as does
``optimizer_params``). One ``step(closure)``:

1. e = rho · g / ||g|| (ASAM with ``adaptive=True``: e = rho · |w|² ⊙ g / ||w ⊙ g||), w ← w + e
2. ``closure()`` recomputes the loss and gradients at the perturbed weights
3. w ← w − e, then the base optimizer steps with those gradients.

The trainer passes every ``optimizer.step`` a closure over the current batch (SPEC §7 "Optimizer control"),
so SAM needs no training-loop changes; each step costs a second forward and backward.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, Iterable, Optional, Union

import torch

from .registry import OPTIMIZERS

__all__ = ["SAM"]


@OPTIMIZERS.register
class SAM(torch.optim.Optimizer):
    """Sharpness-Aware Minimization around ``base`` (a torch.optim name or class; its kwargs in ``**kwargs``).

    Param groups, lr and the schedules' writes are shared with the base optimizer; ``state_dict()`` is the
    base optimizer's (SAM itself keeps only the transient perturbation).
    """

    def __init__(self, params: Iterable[Any], base: Union[str, type] = "SGD", rho: float = 0.05,
                 adaptive: bool = False, **kwargs: Any) -> None:
        if float(rho) < 0:
            raise ValueError(f"SAM rho must be >= 0, got {rho!r}")
        base_cls = OPTIMIZERS.get(base) if isinstance(base, str) else base
        if not (isinstance(base_cls, type) and issubclass(base_cls, torch.optim.Optimizer)) or base_cls is SAM:
            raise ValueError(f"SAM base must be a torch optimizer name or class (not SAM), got {base!r}")
        super().__init__(params, dict(rho=float(rho), adaptive=bool(adaptive), **kwargs))
        self.base_optimizer = base_cls(self.param_groups, **kwargs)
        self.param_groups = self.base_optimizer.param_groups  # the same group dicts: lr writes reach the base
        self.defaults.update(self.base_optimizer.defaults)

    @torch.no_grad()
    def _grad_norm(self) -> torch.Tensor:
        norms = []
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad * p.abs() if group["adaptive"] else p.grad
                norms.append(torch.linalg.vector_norm(g, 2))
        if not norms:
            return torch.zeros(())
        return torch.linalg.vector_norm(torch.stack([n.to(norms[0].device) for n in norms]), 2)

    @torch.no_grad()
    def first_step(self) -> None:
        """Move to the perturbed weights w + e."""
        norm = self._grad_norm()
        for group in self.param_groups:
            scale = group["rho"] / (norm + 1e-12)
            for p in group["params"]:
                if p.grad is None:
                    continue
                e = (p * p if group["adaptive"] else 1.0) * p.grad * scale.to(p)
                p.add_(e)
                self.state[p]["e_w"] = e

    @torch.no_grad()
    def second_step(self) -> None:
        """Return to w and step the base optimizer with the gradients taken at w + e."""
        for group in self.param_groups:
            for p in group["params"]:
                e = self.state[p].pop("e_w", None) if p in self.state else None
                if e is not None:
                    p.sub_(e)
        self.base_optimizer.step()

    def step(self, closure: Optional[Callable[[], Any]] = None) -> Any:  # type: ignore[override]
        if closure is None:
            raise ValueError("SAM.step needs a closure (the Trainer passes one); in your own loop pass one that zeroes "
                             "the gradients, recomputes the loss, calls backward() and returns the loss")
        self.first_step()
        with torch.enable_grad():
            loss = closure()
        self.second_step()
        return loss

    def state_dict(self) -> Dict[str, Any]:
        return self.base_optimizer.state_dict()

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        self.base_optimizer.load_state_dict(state_dict)
        self.param_groups = self.base_optimizer.param_groups  # load replaces the group dicts
