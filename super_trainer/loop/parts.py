"""What the loop runs with: :class:`RunParts`, the immutable products of building a run, and :class:`Meters`, which
turn batches into ``metrics_dict`` (loss averages first, then metric titles)."""
from __future__ import annotations

import dataclasses
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from ..callbacks.base import CallbackHandler
from ..context import PhaseContext
from ..ema import ModelEMA
from ..losses import check_loss_value
from ..metrics import LossAverageMeter, LossAverager, loss_names, make_collection, metric_values
from ..params import TrainingParams

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
    optimizer: Optional[torch.optim.Optimizer]  # None for Trainer.test
    scaler: Optional[torch.amp.GradScaler]
    autocast: Any  # a reusable context manager: torch.autocast, or a no-op when mixed precision is off
    ema: Optional[ModelEMA]
    test_loaders: Dict[str, Any]
    distributed: bool = False  # under torchrun (DDP)


class Meters:
    """Loss averages and metric collections of the train, validation and test passes, and the loss names."""

    def __init__(self, context: PhaseContext, declared_loss_names: Optional[Sequence[str]],
                 known_names: Optional[List[str]], metrics: Mapping[str, Mapping[str, Any]],
                 device: torch.device) -> None:
        self.context = context  # gets SG's loss_avg_meter / metrics_compute_fn / loss_logging_items_names
        self.declared = list(declared_loss_names) if declared_loss_names else None  # loss_logging_items_names
        self.loss_names = known_names  # None until the loss's first output names them
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
            self.collections["train"].update(context.preds.detach(), context.target)

    def train_results(self) -> Dict[str, Any]:
        return self._results(self.train_loss, self.collections["train"])

    def start_eval(self, kind: str) -> Any:
        """Reset the evaluation meters of ``kind`` ("valid" or "test"); returns its metric collection."""
        self.eval_loss.reset()
        collection = self.collections[kind]
        if collection is not None:
            collection.reset()
        self.context.trainer_update(loss_avg_meter=self.eval_meter, metrics_compute_fn=collection)
        return collection

    def eval_results(self, kind: str) -> Dict[str, Any]:
        return self._results(self.eval_loss, self.collections[kind])

    def _results(self, losses: LossAverager, collection: Any) -> Dict[str, Any]:
        results: Dict[str, Any] = dict(zip(self.loss_names or [], losses.average()))
        if collection is not None:
            results.update(metric_values(collection))
        return results
