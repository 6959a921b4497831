"""What the loop runs with: :class:`RunParts`, the immutable products of building a run, and :class:`Meters`, which
turn batches into ``metrics_dict`` (loss averages first, then metric titles)."""
from __future__ import annotations

import dataclasses
import functools
import operator
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from ..batches import BatchReader, metric_preds
from ..callbacks.base import CallbackHandler
from ..context import PhaseContext
from ..ema import ModelEMA
from ..losses import check_loss_value
from ..metrics import LossAverageMeter, LossAverager, loss_names, make_collection, metric_values, update_metrics
from ..params import TrainingParams
from .optimizers import OptimizerSet

__all__ = ["RunParts", "Meters"]


@dataclasses.dataclass(frozen=True)
class RunParts:
    """Everything one ``train()`` call built; none of it is replaced while training. What a callback may change
    (criterion, loaders, stop flags, counters) lives on ``context`` instead, so the loop sees every write."""

    params: TrainingParams
    context: PhaseContext
    callbacks: CallbackHandler
    net: nn.Module  # the user's model (unwrapped), trained in place; checkpoints hold its state_dict
    model: nn.Module  # what the forward pass calls: net, DDP(net) or a compiled wrapper
    optimizer: Optional[torch.optim.Optimizer]  # None for Trainer.test; the first one with several
    scaler: Optional[torch.amp.GradScaler]
    autocast: Any  # a reusable context manager: torch.autocast, or a no-op when mixed precision is off
    ema: Optional[ModelEMA]
    test_loaders: Dict[str, Any]
    distributed: bool = False  # under torchrun (DDP)
    optimizers: Optional[OptimizerSet] = None  # every optimizer by name (context.optimizers); None for Trainer.test
    read_batch: Optional[BatchReader] = None  # batch -> (inputs, target, extras) on the device (SPEC §8 "Batches")
    train_step: Optional[Callable[[PhaseContext], Any]] = None  # replaces forward + criterion in training


class Meters:
    """Loss averages and metric collections of the train, validation and test passes, and the loss names."""

    def __init__(self, context: PhaseContext, declared_loss_names: Optional[Sequence[str]],
                 known_names: Optional[List[str]], metrics: Mapping[str, Mapping[str, Any]],
                 device: torch.device) -> None:
        self.context = context  # gets SG's loss_avg_meter / metrics_compute_fn / loss_logging_items_names
        self.declared = list(declared_loss_names) if declared_loss_names else None  # loss_logging_items_names
        self.loss_names = known_names  # None until the loss's first output names them
        self.step_names: Optional[List[str]] = None  # a train_step's own names (dict keys, components), if any
        self.train_loss = LossAverager()
        self.eval_loss = LossAverager()
        self.train_meter, self.eval_meter = LossAverageMeter(self.train_loss), LossAverageMeter(self.eval_loss)
        self.collections = {kind: make_collection(dict(metrics.get(kind) or {}), device)
                            for kind in ("train", "valid", "test")}
        self.checked_criterion: Any = None  # the criterion whose output passed check_loss_value
        self.last_valid: Dict[str, Any] = {}  # the last validation's metrics_dict
        self.test_results: Dict[str, Dict[str, Any]] = {}  # loader name -> its last metrics_dict

    # ---- the loss --------------------------------------------------------------------------------
    def compute_loss(self, criterion: Any, preds: Any, target: Any) -> Tuple[torch.Tensor, torch.Tensor]:
        """The criterion's value and its detached log items (the 0-d loss itself, or the ``(K,)`` components
        of a loss that returns ``(loss, components)``); names the components on first use."""
        out = criterion(preds, target)
        if criterion is not self.checked_criterion:  # a new criterion's first output: a 0-d float tensor?
            check_loss_value(out[0] if type(out) is tuple else out, criterion)
            self.checked_criterion = criterion
        if type(out) is tuple:
            loss, components = out
            items = components.detach().reshape(-1)
            if self.loss_names is None or len(self.loss_names) != items.numel():
                self._name_items(criterion, items.numel())
            return loss, items
        if self.loss_names is None or len(self.loss_names) != 1:
            self._name_items(criterion, 1)
        return out, out.detach()

    def read_step(self, out: Any, criterion: Any) -> Tuple[torch.Tensor, torch.Tensor]:
        """A train_step's result: ``loss``, ``(loss, components)`` or ``{name: loss}`` → (the loss to backward, its
        detached log items). A tensor is logged under the loss's name, as validation logs it; components under
        ``<loss>/<component>``; a dict entry under its key, and the dict's sum is the loss."""
        if isinstance(out, Mapping) and out:
            values = [_scalar(v, f"train_step's {k!r}") for k, v in out.items()]
            names = [str(k) for k in out]
            if self.step_names is not None and self.step_names != names:
                raise ValueError(f"train_step returned the losses {names}, earlier batches {self.step_names}")
            self.step_names = names
            items = torch.stack([v.detach().float() for v in values])
            return functools.reduce(operator.add, values), items
        if type(out) is tuple and len(out) == 2:
            if not isinstance(out[1], torch.Tensor):
                raise ValueError(f"training_params.train_step: returned (loss, components) with components of type "
                                 f"{type(out[1]).__name__}; give a 1-d tensor")
            loss, items = _scalar(out[0], "train_step's loss"), out[1].detach().reshape(-1)
        else:
            loss = _scalar(out, "train_step's result")
            items = loss.detach()
        count = items.numel()
        if self.step_names is None or len(self.step_names) != count:
            if self.step_names is not None:
                raise ValueError(f"train_step returned {count} loss items, earlier batches {len(self.step_names)}")
            declared = self.declared or getattr(criterion, "component_names", None)
            self.step_names = loss_names(criterion, list(declared) if declared and count > 1 else None,
                                         count if count > 1 else 0)
        return loss, items

    @property
    def train_names(self) -> List[str]:
        """The metrics_dict loss keys of the train pass."""
        return list(self.step_names or self.loss_names or [])

    def _name_items(self, criterion: Any, count: int) -> None:
        declared = self.declared or getattr(criterion, "component_names", None)
        if declared and len(declared) != count:
            raise ValueError(f"training_params.loss_logging_items_names has {len(declared)} names but the loss "
                             f"returned {count} components")
        if self.loss_names is not None and len(self.loss_names) != count:
            raise ValueError(f"the loss returned {count} components, earlier batches {len(self.loss_names)}")
        self.loss_names = loss_names(criterion, list(declared) if declared else None, count if count > 1 else 0)
        self.context.trainer_update(loss_logging_items_names=self.loss_names)

    # ---- passes ----------------------------------------------------------------------------------
    def start_train(self) -> None:
        self.train_loss.reset()
        if self.collections["train"] is not None:
            self.collections["train"].reset()
        self.context.trainer_update(loss_avg_meter=self.train_meter, metrics_compute_fn=self.collections["train"])

    def add_train(self, context: PhaseContext) -> None:
        """One train batch's loss items and metric update."""
        self.train_loss.add(context.loss_log_items)
        if self.collections["train"] is not None:
            if context.preds is None:
                raise ValueError("training_params.train_metrics_list: the train_step stored no context.preds to "
                                 "compute the train metrics on; store the model's output there, or drop the metrics")
            update_metrics(self.collections["train"], metric_preds(context.preds).detach(), context.target, context)

    def train_results(self) -> Dict[str, Any]:
        return self._results(self.train_loss, self.collections["train"], self.train_names)

    def start_eval(self, kind: str) -> Any:
        """Reset the evaluation meters of ``kind`` ("valid" or "test"); returns its metric collection."""
        self.eval_loss.reset()
        collection = self.collections[kind]
        if collection is not None:
            collection.reset()
        self.context.trainer_update(loss_avg_meter=self.eval_meter, metrics_compute_fn=collection)
        return collection

    def eval_results(self, kind: str) -> Dict[str, Any]:
        return self._results(self.eval_loss, self.collections[kind], self.loss_names or [])

    def _results(self, losses: LossAverager, collection: Any, names: List[str]) -> Dict[str, Any]:
        results: Dict[str, Any] = dict(zip(names, losses.average()))
        if collection is not None:
            results.update(metric_values(collection))
        return results


def _scalar(value: Any, what: str) -> torch.Tensor:
    if not isinstance(value, torch.Tensor) or value.numel() != 1:
        shown = f"a tensor of shape {tuple(value.shape)}" if isinstance(value, torch.Tensor) else type(value).__name__
        raise ValueError(f"training_params.train_step: {what} must be a scalar tensor (the loss to backward), got "
                         f"{shown}")
    return value if value.dim() == 0 else value.reshape(())
