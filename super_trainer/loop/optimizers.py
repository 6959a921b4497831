"""The run's optimizers (SPEC §8 "Several optimizers", "Optimizer lifecycle events"): ``context.optimizers``, what
checkpoints hold of them and how a resume restores them, and ``on_optimizer_built``.

``context.optimizers[name].update(loss)``, called by a ``train_step``, runs one update of that optimizer with the
events of SPEC §1 (``TrainingLoop.update_weights`` in ``fit.py`` fires them): backward (scaled for mixed precision
and accumulation; only into this optimizer's parameters), the gradient all-reduce under torchrun on the stepping
micro-batch, clipping, the step and zero_grad. ``context.optimizer_name`` names the optimizer meanwhile.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.autograd import profiler as _profiler
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from ..checkpoint import CheckpointError, check_optimizer_fits

__all__ = ["OptimizerHandle", "OptimizerHandles", "OptimizerSet", "GradientSync", "optimizers_built"]


class OptimizerHandle:
    """One optimizer of the run, as ``context.optimizers[name]``: ``optimizer`` (the torch optimizer), ``name``,
    ``param_groups``, and ``update(loss)`` for a ``train_step``."""

    def __init__(self, name: str, optimizer: torch.optim.Optimizer, restricted: bool) -> None:
        self.name = name
        self.optimizer = optimizer
        self.restricted = restricted  # backward writes only this optimizer's gradients (several optimizers)
        self._update: Optional[Callable[["OptimizerHandle", Any], None]] = None  # set while a train_step runs
        # an optimizer class with a zero_grad of its own always gets it called (one set on the instance too)
        self._own_zero_grad = type(optimizer).zero_grad is not torch.optim.Optimizer.zero_grad

    @property
    def param_groups(self) -> List[Dict[str, Any]]:
        return self.optimizer.param_groups

    def parameters(self) -> List[torch.Tensor]:
        """This optimizer's parameters that are trainable now (a callback may freeze or unfreeze some)."""
        return [p for group in self.optimizer.param_groups for p in group["params"] if p.requires_grad]

    def clear_grads(self) -> None:
        """``optimizer.zero_grad(set_to_none=True)``, without torch's per-call profiler annotation while no
        profiler records: the annotation costs about 6 us per call on CPU in isolation, 12-15 us inside a small
        model's step (7 % of it).
        Under a profiler, and for an optimizer with its own zero_grad, zero_grad itself is called."""
        if self._own_zero_grad or _profiler._is_profiler_enabled or "zero_grad" in vars(self.optimizer):
            self.optimizer.zero_grad(set_to_none=True)
            return
        for group in self.optimizer.param_groups:
            for param in group["params"]:
                param.grad = None

    def update(self, loss: torch.Tensor) -> None:
        """Backward ``loss`` into this optimizer's parameters and, on the stepping micro-batch, step; with the
        events of one update. Only inside a ``train_step``."""
        if self._update is None:
            raise RuntimeError(f"context.optimizers[{self.name!r}].update(loss) works only inside "
                               "training_params.train_step (the trainer updates at the other times)")
        self._update(self, loss)

    def __repr__(self) -> str:
        return f"OptimizerHandle({self.name!r}, {type(self.optimizer).__name__})"


class OptimizerHandles(Mapping):
    """``context.optimizers``: name → :class:`OptimizerHandle`, read-only (the trainer keeps the ones it built)."""

    def __init__(self, handles: Dict[str, OptimizerHandle]) -> None:
        self._handles = dict(handles)

    def __getitem__(self, name: str) -> OptimizerHandle:
        try:
            return self._handles[name]
        except KeyError:
            raise KeyError(f"no optimizer {name!r}; the run's optimizers are {list(self._handles)}") from None

    def __iter__(self) -> Iterator[str]:
        return iter(self._handles)

    def __len__(self) -> int:
        return len(self._handles)

    def __repr__(self) -> str:
        return f"OptimizerHandles({list(self._handles.values())})"


class OptimizerSet:
    """The run's optimizers by name (``{"default": optimizer}`` for one): their handles, the lrs of all their
    param groups in order, and their part of a checkpoint."""

    def __init__(self, optimizers: Mapping[str, torch.optim.Optimizer]) -> None:
        self.several = len(optimizers) > 1
        self.handles = OptimizerHandles({name: OptimizerHandle(name, opt, self.several)
                                         for name, opt in optimizers.items()})
        self.first = next(iter(self.handles.values()))

    def __iter__(self) -> Iterator[OptimizerHandle]:
        return iter(self.handles.values())

    def bind(self, update: Optional[Callable[[OptimizerHandle, Any], None]]) -> None:
        """Let ``update(loss)`` run the loop's update (while a train_step runs), or refuse it again (None)."""
        for handle in self:
            handle._update = update

    def param_groups(self) -> List[Dict[str, Any]]:
        return [group for handle in self for group in handle.param_groups]

    def lrs(self) -> List[float]:
        return [group["lr"] for group in self.param_groups()]

    def set_lrs(self, lrs: List[float]) -> None:
        for group, lr in zip(self.param_groups(), lrs):
            group["lr"] = lr

    # ---- checkpoints ------------------------------------------------------------------------------
    def checkpoint_state(self) -> Dict[str, Any]:
        """``optimizer_type`` and ``optimizer_state_dict``: one optimizer's as in 0.2, several by name."""
        if not self.several:
            optimizer = self.first.optimizer
            return {"optimizer_type": type(optimizer).__name__, "optimizer_state_dict": optimizer.state_dict()}
        return {"optimizer_type": {h.name: type(h.optimizer).__name__ for h in self},
                "optimizer_state_dict": {h.name: h.optimizer.state_dict() for h in self}}

    def check(self, state: Mapping[str, Any], path: Path) -> None:
        """CheckpointError naming the path when a checkpoint's optimizer state does not fit these optimizers (another
        optimizer, another mapping, other param groups); checked before anything is loaded."""
        states, types = state["optimizer_state_dict"], state.get("optimizer_type")
        saved_several = isinstance(types, Mapping) or (isinstance(states, Mapping) and "param_groups" not in states)
        if not self.several and not saved_several:
            return check_optimizer_fits(self.first.optimizer, state, path)
        names = list(self.handles)
        saved = list(states) if saved_several and isinstance(states, Mapping) else ["(one optimizer)"]
        if not (self.several and saved_several) or saved != names:
            raise CheckpointError(f"checkpoint {path} holds the state of optimizers {saved}, this run has {names}; "
                                  "resume with the same optimizer mapping")
        for handle in self:
            own = {"optimizer_type": (types or {}).get(handle.name), "optimizer_state_dict": states[handle.name]}
            try:
                check_optimizer_fits(handle.optimizer, own, path)
            except CheckpointError as err:
                raise CheckpointError(f"optimizer {handle.name!r}: {err}") from None

    def load(self, state: Mapping[str, Any]) -> None:
        """Restore every optimizer from a checkpoint that passed :meth:`check`."""
        states = state["optimizer_state_dict"]
        if not self.several:
            self.first.optimizer.load_state_dict(states)
            return
        for handle in self:
            handle.optimizer.load_state_dict(states[handle.name])


class GradientSync:
    """Under torchrun with a ``train_step``: the trainer averages gradients over the ranks itself (a step may run
    several forwards and backwards, which DDP's wrapper cannot follow). Parameters and buffers start from rank 0's;
    buffers (BatchNorm statistics) are broadcast from rank 0 before every batch, as DDP does before a forward."""

    def __init__(self, net: nn.Module) -> None:
        self.world = dist.get_world_size()
        self.buffers = [b for b in net.buffers()]
        for tensor in [*net.parameters(), *self.buffers]:
            dist.broadcast(tensor.data, src=0)

    def broadcast_buffers(self) -> None:
        for buffer in self.buffers:
            dist.broadcast(buffer, src=0)

    def average(self, params: List[torch.Tensor]) -> None:
        """The gradients of ``params`` averaged over the ranks (divided first, as DDP does); one all-reduce."""
        grads = [p.grad for p in params if p.grad is not None]
        if not grads:
            return
        flat = _flatten_dense_tensors(grads)
        flat.div_(self.world)
        dist.all_reduce(flat)
        for grad, synced in zip(grads, _unflatten_dense_tensors(flat, grads)):
            grad.copy_(synced)


def optimizers_built(parts: Any) -> None:
    """``on_optimizer_built`` (``parts``: the run's RunParts): right after the optimizers and their param groups were built, before a checkpoint is
    restored, so a param group a callback adds here is there when the resume loads the optimizer state. The
    context's trainer-owned fields are locked from here on. A group added here (or at any later time) takes its
    lr then as its ``initial_lr``, the lr0 of every schedule."""
    context, fire = parts.context, parts.callbacks
    context.lock_trainer_owned()
    fire.on_optimizer_built(context)
    for group in parts.optimizers.param_groups():
        group.setdefault("initial_lr", group["lr"])
