"""The training loop: every event of SPEC §1 on its own line, in the order of the diagram in ``callbacks/base.py``.

Each concern the loop serves is one named call to its owner: the work of a step (``step.py``), whether to go on
(``stops.py``), where the running epoch is and what a resume restores (``resume.py``), which checkpoints are
written (``checkpoints.py``), and the no-grad passes (``evaluate.py``).
"""
from __future__ import annotations

import logging
import math
import warnings
from typing import Any, Dict, Iterator, Optional, Tuple

from ..batches import count_batches, optimizer_steps_per_epoch, to_device
from ..metrics import check_default_metrics, lookup_metric, warn_non_finite_metrics
from .checkpoints import CheckpointManager
from .evaluate import evaluate, test_pass
from .parts import Meters, RunParts
from .resume import EpochCursor, ResumePlan
from .step import TrainStep
from .stops import NonFiniteGuard, StopControl

__all__ = ["TrainingLoop"]

logger = logging.getLogger("super_trainer")


class TrainingLoop:
    """Runs one ``train()`` call's epochs over the parts the Trainer built."""

    def __init__(self, parts: RunParts, meters: Meters, plan: ResumePlan, checkpoints: CheckpointManager) -> None:
        self.parts, self.ctx, self.fire, self.params = parts, parts.context, parts.callbacks, parts.params
        self.meters, self.resume, self.checkpoints = meters, plan, checkpoints
        self.step = TrainStep(parts, meters)
        guard = NonFiniteGuard(parts.params.stop_on_non_finite_loss, parts.params.log_interval, meters.train_loss)
        self.stops = StopControl(parts.context, guard, parts.distributed)
        self.counted: Tuple[Any, Optional[int]] = (None, None)  # (train loader, its batches per epoch)
        self.epoch_results: Dict[str, Dict[str, Any]] = {}  # the running epoch's "train" and "valid" metrics

    # ---- the run --------------------------------------------------------------------------------------
    def fit(self) -> str:
        """on_training_start, the epochs, then on_training_end exactly once, whatever happens; returns the stop
        reason. An exception propagates after on_training_end (with context.exception set)."""
        ctx, fire, stops = self.ctx, self.fire, self.stops
        ctx.lock_trainer_owned()
        try:
            with stops:
                fire.on_training_start(ctx)
                self.resume.at_training_start()
                if not self.resume.resumed:
                    self.checkpoints.keep_initial(ctx)  # ckpt_latest is loadable whatever happens next
                for _ in self.epochs():
                    if not self.train_epoch():
                        break  # stopped during a batch: the partial epoch is not validated, tested nor saved
                    improved = self.validate() if self.validation_due() else False
                    stops.agree(ctx)
                    if self.test_due():
                        self.test_all()
                    self.record_history()
                    fire.on_epoch_end(ctx)
                    self.checkpoints.save_epoch(ctx, improved)
                    if ctx.stop_training:
                        break
        except KeyboardInterrupt:
            stops.interrupted_now(ctx)
            logger.info("training interrupted; %s holds the last checkpointed state", self.checkpoints.latest)
        except BaseException as err:
            ctx.exception = err
            raise
        finally:
            write_error = self.checkpoints.finish()  # the last write lands before on_training_end
            ctx.stop_reason = _final_reason(ctx, write_error)
            fire.on_training_end(ctx)
        if write_error is not None:
            raise write_error
        return ctx.stop_reason

    def train_epoch(self) -> bool:
        """One pass over the train loader; False when it was cut short (a stop during a batch, Ctrl-C, a non-finite
        loss)."""
        ctx, fire, step, stops = self.ctx, self.fire, self.step, self.stops
        epoch = self.open_epoch()                           # fresh, or mid-epoch: same batches, RNG, gradients
        fire.on_train_loader_start(ctx)
        epoch.restore_lrs()                                 # a mid-epoch resume keeps the checkpoint's lr
        stops.open_epoch()                                  # a stop set outside a batch waits for the epoch's end
        try:
            for batch_idx, batch, is_last in epoch.batches():
                epoch.begin(batch_idx)
                ctx.inputs, ctx.target, ctx.additional_batch_items = to_device(batch, ctx.device)
                fire.on_train_batch_start(ctx)
                stepping = step.is_stepping(batch_idx, is_last)
                step.forward_loss(ctx, stepping)            # preds, loss, loss_log_items
                self.meters.add_train(ctx)
                fire.on_train_batch_loss_end(ctx)
                if stops.go_on(ctx):                        # every rank agrees before backward's all-reduce
                    epoch.updating()
                    step.backward(ctx, batch_idx)
                    fire.on_train_batch_backward_end(ctx)
                    if stepping and not ctx.stop_training:
                        step.unscale(batch_idx, is_last)
                        fire.on_train_batch_gradient_step_start(ctx)
                        if step.step(ctx):                  # False after a stop or skip_step
                            fire.on_train_batch_gradient_step_end(ctx)
                            stops.check_losses_periodically(ctx)
                epoch.end(batch_idx)
                fire.on_train_batch_end(ctx)
                due = self.checkpoints.mid_epoch_due(ctx, is_last)
                if stops.end_of_batch(ctx, read_losses=due):  # a stop, the first Ctrl-C, or a bad loss, on all ranks
                    break
                if due:
                    self.checkpoints.save_progress(epoch)
        except KeyboardInterrupt:                           # a second Ctrl-C, or one no handler could defer
            stops.interrupted_now(ctx)
            if epoch.in_batch:
                fire.on_train_batch_end(ctx)
        if stops.interrupted_pass:
            self.checkpoints.at_interrupt(ctx, epoch, stops)
        return self.close_epoch(epoch)

    def close_epoch(self, epoch: EpochCursor) -> bool:
        """The train pass's metrics and lrs onto the context, the stop decision, then on_train_loader_end."""
        ctx = self.ctx
        ctx.metrics_dict = self.meters.train_results()
        ctx.trainer_update(epoch_lrs=epoch.lrs())          # before epoch-end schedules change them
        complete = self.stops.epoch_completed(ctx, ctx.metrics_dict, self.meters.loss_names or [])
        if not complete:
            self.step.drop_window()                         # an unfinished accumulation window is dropped
        self.fire.on_train_loader_end(ctx)
        self.epoch_results = {"train": dict(ctx.metrics_dict), "valid": {}, "seconds": epoch.seconds()}
        return complete

    def open_epoch(self) -> EpochCursor:
        n_batches = self.count_train_batches()
        self.step.start_epoch(n_batches)
        self.meters.start_train()
        self.parts.model.train()
        return self.resume.open_epoch(self.parts, self.meters, n_batches)

    def epochs(self) -> Iterator[int]:
        """Sets context.epoch to each epoch to run, from the first (the checkpoint's on a resume) while it is below
        ``context.max_epochs`` (read each time: a callback may extend the run)."""
        epoch = self.ctx.epoch
        while epoch < self.ctx.max_epochs:
            self.ctx.trainer_update(epoch=epoch)
            yield epoch
            epoch += 1

    # ---- validation, test, history --------------------------------------------------------------------
    def validate(self) -> bool:
        """One pass over the valid loader (EMA weights when EMA is on); True when metric_to_watch improved."""
        ctx, fire, limit = self.ctx, self.fire, self.params.max_valid_batches
        fire.on_validation_loader_start(ctx)
        evaluate(self.parts, self.meters, "valid", ctx.valid_loader, limit, fire.on_validation_batch_start,
                 fire.on_validation_batch_end, self.stops.interrupted)
        if ctx.epoch == 0:  # targets a sample could not show before training (an iterable dataset)
            check_default_metrics(self.params, ctx.target)
        ctx.metrics_dict = self.meters.eval_results("valid")
        warn_non_finite_metrics(ctx.metrics_dict, self.params.metric_to_watch)
        fire.on_validation_loader_end(ctx)
        self.epoch_results["valid"] = self.meters.last_valid = dict(ctx.metrics_dict)
        return self.track_best()

    def track_best(self) -> bool:
        """Fire on_validation_end_best_epoch when metric_to_watch strictly improved."""
        ctx = self.ctx
        value = lookup_metric(self.meters.last_valid, self.params.metric_to_watch)
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return False
        best, greater = ctx.best_metric, self.params.greater_metric_to_watch_is_better
        if best is not None and not (value > best if greater else value < best):
            return False
        ctx.trainer_update(best_metric=value, best_epoch=ctx.epoch)
        self.fire.on_validation_end_best_epoch(ctx)
        return True

    def test_all(self) -> None:
        for name, loader in self.parts.test_loaders.items():
            test_pass(self.parts, self.meters, name, loader, self.stops.interrupted)

    def validation_due(self) -> bool:
        done, params = self.ctx.epoch + 1, self.params
        due = done % params.run_validation_freq == 0 or done == self.ctx.max_epochs or done in params.save_ckpt_epoch_list
        return self.ctx.valid_loader is not None and due

    def test_due(self) -> bool:
        done, every = self.ctx.epoch + 1, self.params.run_test_freq
        last = done == self.ctx.max_epochs or self.ctx.stop_training
        return bool(self.parts.test_loaders) and (last or (every is not None and done % every == 0))

    def record_history(self) -> None:
        results = self.epoch_results
        entry: Dict[str, Any] = {"epoch": self.ctx.epoch, "lr": self.ctx.epoch_lrs[0], "seconds": results["seconds"]}
        entry.update({f"train/{k}": v for k, v in results["train"].items()})
        entry.update({f"valid/{k}": v for k, v in results["valid"].items()})
        self.ctx.history.append(entry)

    def count_train_batches(self) -> Optional[int]:
        """Batches in this epoch's pass over ``context.train_loader`` (a callback may have replaced it)."""
        loader, counted = self.counted
        if self.ctx.train_loader is not loader:
            loader = self.ctx.train_loader
            counted = count_batches(loader, self.params.max_train_batches)
            steps = optimizer_steps_per_epoch(self.params, counted)
            if self.counted[0] is not None and steps != self.ctx.steps_per_epoch and self.ctx.steps_per_epoch is not None:
                warnings.warn(f"context.train_loader was replaced by one with {steps} optimizer steps per epoch "
                              f"instead of {self.ctx.steps_per_epoch}; LR schedules and EMA computed their "
                              "horizon from the first loader", stacklevel=4)
            self.counted = (loader, counted)
            self.ctx.trainer_update(steps_per_epoch=steps)
        return counted


def _final_reason(ctx: Any, write_error: Optional[BaseException]) -> str:
    """Why training ended: an exception, Ctrl-C, a stop's reason, or "completed"; a failed last write counts as
    an exception unless one is already propagating."""
    if ctx.exception is not None:
        return "exception"
    if isinstance(write_error, KeyboardInterrupt):  # Ctrl-C while waiting for the last write
        return "interrupted"
    if write_error is not None:
        ctx.exception = write_error
        return "exception"
    if ctx.stop_reason == "interrupted":
        return "interrupted"
    return (ctx.stop_reason or "stopped_by_callback") if ctx.stop_training else "completed"
