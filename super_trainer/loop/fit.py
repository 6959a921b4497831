"""The training loop: every event of SPEC §1 on its own line, in the order of the diagram in ``callbacks/base.py``.

Each concern the loop serves is one named call to its owner: the work of a step (``step.py``), the optimizers
(``optimizers.py``), the per-epoch settings (``settings.py``), whether to go on (``stops.py``), where the running
epoch is and what a resume restores (``resume.py``), which checkpoints are written (``checkpoints.py``), and the
no-grad passes (``evaluate.py``).
"""
from __future__ import annotations

import logging
import math
from typing import Any, Dict, Iterator, Optional

from ..metrics import check_default_metrics, lookup_metric, warn_non_finite_metrics
from .checkpoints import CheckpointManager
from .evaluate import evaluate, test_pass
from .optimizers import OptimizerHandle
from .parts import Meters, RunParts
from .resume import EpochCursor, ResumePlan
from .settings import EpochSettings
from .step import TrainStep
from .stops import NonFiniteGuard, StopControl

__all__ = ["TrainingLoop"]

logger = logging.getLogger("super_trainer")


class TrainingLoop:
    """Runs one ``train()`` call's epochs over the parts the Trainer built."""

    def __init__(self, parts: RunParts, meters: Meters, plan: ResumePlan, checkpoints: CheckpointManager) -> None:
        self.parts, self.ctx, self.fire, self.params = parts, parts.context, parts.callbacks, parts.params
        self.meters, self.resume, self.checkpoints = meters, plan, checkpoints
        self.settings = EpochSettings(parts)
        self.step = TrainStep(parts, meters, self.optimizer_update)
        self.read_batch = parts.read_batch
        guard = NonFiniteGuard(parts.params.stop_on_non_finite_loss, parts.params.log_interval, meters.train_loss)
        self.stops = StopControl(parts.context, guard, parts.distributed)
        self.cursor: Optional[EpochCursor] = None  # the running epoch's
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
        epoch = self.cursor = self.open_epoch()             # fresh, or mid-epoch: same batches, RNG, gradients
        fire.on_train_loader_start(ctx)
        self.start_pass(epoch)                              # settings written at on_train_loader_start apply now
        stops.open_epoch()                                  # a stop set outside a batch waits for the epoch's end
        try:
            for batch_idx, batch, is_last in epoch.batches():
                epoch.begin(batch_idx)
                ctx.inputs, ctx.target, ctx.additional_batch_items = self.read_batch(batch)
                fire.on_train_batch_start(ctx)
                step.begin(batch_idx, is_last)
                step.forward_loss(ctx)                      # or the train_step, whose own updates fire the events
                self.meters.add_train(ctx)
                if step.trainer_updates:
                    self.update_weights(step.first)         # on_train_batch_loss_end ... _gradient_step_end
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

    def update_weights(self, handle: OptimizerHandle) -> None:
        """One optimizer update of the running batch with its events: the trainer's own after forward and loss, or
        one a train_step asks for with ``context.optimizers[name].update(loss)``."""
        ctx, fire, step, stops = self.ctx, self.fire, self.step, self.stops
        fire.on_train_batch_loss_end(ctx)
        if stops.go_on(ctx):                                # every rank agrees before backward's all-reduce
            self.cursor.updating()
            step.backward(ctx, handle)
            fire.on_train_batch_backward_end(ctx)
            if step.stepping and not ctx.stop_training:
                step.unscale(handle)
                fire.on_train_batch_gradient_step_start(ctx)
                if step.step(ctx, handle):                  # False after a stop or skip_step
                    fire.on_train_batch_gradient_step_end(ctx)
                    stops.check_losses_periodically(ctx)

    def optimizer_update(self, handle: OptimizerHandle, loss: Any) -> None:
        """``context.optimizers[name].update(loss)`` inside a train_step, with ``context.optimizer_name`` set."""
        self.step.own_loss(self.ctx, handle, loss)
        try:
            self.update_weights(handle)
        finally:
            self.ctx.optimizer_name = None

    def close_epoch(self, epoch: EpochCursor) -> bool:
        """The train pass's metrics and lrs onto the context, the stop decision, then on_train_loader_end."""
        ctx = self.ctx
        ctx.metrics_dict = self.meters.train_results()
        ctx.trainer_update(epoch_lrs=epoch.lrs())          # before epoch-end schedules change them
        complete = self.stops.epoch_completed(ctx, ctx.metrics_dict, self.meters.train_names)
        self.step.end_pass(complete)                        # no gradient of this pass leaks into the next
        self.fire.on_train_loader_end(ctx)
        self.epoch_results = {"train": dict(ctx.metrics_dict), "valid": {}, "seconds": epoch.seconds()}
        return complete

    def open_epoch(self) -> EpochCursor:
        self.settings.apply()                               # settings written since the last epoch
        self.meters.start_train()
        self.parts.model.train()
        return self.resume.open_epoch(self.parts, self.meters)

    def start_pass(self, epoch: EpochCursor) -> None:
        """After on_train_loader_start: the batch count and accumulation of this pass, and a mid-epoch resume's
        lrs (an epoch-start schedule just ran again, but the lr is the checkpoint's)."""
        n_batches, accumulate = self.settings.apply()
        self.step.start_epoch(n_batches, accumulate)
        epoch.start(n_batches)

    def epochs(self) -> Iterator[int]:
        """Sets context.epoch to each epoch to run, from the first (the checkpoint's on a resume) while it is below
        max_epochs (read each time: a callback may extend the run)."""
        epoch = self.ctx.epoch
        while epoch < self.settings.current_max_epochs():
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
