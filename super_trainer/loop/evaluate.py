"""The no-grad passes: the batch loop shared by validation and test, and one whole test pass (used by the training
loop after its epochs and by ``Trainer.test``)."""
from __future__ import annotations

import contextlib
from typing import Any, Callable, Dict, Iterator, Optional, Tuple

import torch

from ..batches import BatchReader, call_model, count_batches, metric_preds, numbered, samples_in
from ..context import PhaseContext
from ..fsdp import is_fsdp2
from ..metrics import update_metrics
from ..sharding import equalized_batches, gather_counts
from .parts import Meters, RunParts

__all__ = ["evaluate", "test_pass"]

Event = Callable[[PhaseContext], None]


def evaluate(parts: RunParts, meters: Meters, kind: str, loader: Any, limit: Optional[int],
             on_batch_start: Event, on_batch_end: Event, interrupted: Callable[[], bool] = lambda: False) -> None:
    """Forward, loss and metric update over ``loader`` (at most ``limit`` batches) with the EMA weights when EMA
    is on, in eval mode and without gradients; ``kind`` ("valid" or "test") picks the metrics. The loss is
    averaged per sample (a batch counts by its size), as SuperGradients does; under torchrun over every rank."""
    context = parts.context
    ema_weights = contextlib.ExitStack()  # EMA: its own module, or (FSDP2) its weights swapped into the shards
    model = ema_weights.enter_context(parts.ema.evaluation_model(parts.net)) if parts.ema is not None else parts.net
    was_training = model.training
    model.eval()
    collection = meters.start_eval(kind)
    criterion, owned = context.criterion, context.owned_fields()
    read_batch = parts.read_batch or BatchReader(context.device)  # the train pass's batch rules
    try:
        with torch.no_grad():
            for batch_idx, batch, counted in _batches(parts, loader, limit):
                if interrupted():  # Ctrl-C during evaluation: no need to wait for the pass to end
                    raise KeyboardInterrupt
                if not counted:  # a repeat that keeps this rank in the other ranks' collectives: nothing else
                    with parts.autocast:
                        call_model(model, read_batch(batch)[0])
                    continue
                owned["batch_idx"] = batch_idx
                context.inputs, context.target, context.additional_batch_items = read_batch(batch)
                on_batch_start(context)
                with parts.autocast:
                    context.preds = call_model(model, context.inputs)
                    if criterion is not None:
                        context.loss, context.loss_log_items = meters.compute_loss(criterion, context.preds,
                                                                                   context.target)
                if criterion is not None:
                    meters.eval_loss.add(context.loss_log_items, samples_in(context.inputs, context.target))
                if collection is not None:
                    update_metrics(collection, metric_preds(context.preds), context.target, context)
                on_batch_end(context)
    finally:
        model.train(was_training)
        ema_weights.close()  # FSDP2: the trained weights are back in the shards


def _batches(parts: RunParts, loader: Any, limit: Optional[int]) -> Iterator[Tuple[int, Any, bool]]:
    """``(batch_idx, batch, counted)``. An FSDP2 forward is a collective, so when the ranks' shares have different
    batch counts the shorter ones repeat their last batch, uncounted (sharding.equalized_batches)."""
    n_batches = count_batches(loader, limit)
    batches = ((i, batch, True) for i, batch, _ in numbered(loader, n_batches, limit))
    if is_fsdp2(parts.net):  # also in Trainer.test, whose parts do not say distributed; one process: one count
        counts = gather_counts(n_batches)
        if len(set(counts)) > 1:
            return equalized_batches(batches, counts)
    return batches


def test_pass(parts: RunParts, meters: Meters, name: str, loader: Any,
              interrupted: Callable[[], bool] = lambda: False) -> Dict[str, Any]:
    """One pass over a test loader, firing the test events; returns its metrics_dict."""
    context, fire = parts.context, parts.callbacks
    context.trainer_update(test_loader=loader, test_loader_name=name)
    fire.on_test_loader_start(context)
    evaluate(parts, meters, "test", loader, None, fire.on_test_batch_start, fire.on_test_batch_end, interrupted)
    context.metrics_dict = meters.eval_results("test")
    fire.on_test_loader_end(context)
    results = dict(context.metrics_dict)
    meters.test_results[name] = results
    context.trainer_update(test_metrics=dict(meters.test_results))
    return results
