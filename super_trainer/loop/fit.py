"""The training loop: every event of SPEC §1 on its own line, in the order of the diagram in ``callbacks/base.py``.

Each concern the loop serves is one named call to its owner: the work of a step (``step.py``), the optimizers
(``optimizers.py``), the per-epoch settings (``settings.py``), whether to go on (``stops.py``), when to validate
and test and when the steps run out (``cadence.py``), where the running epoch is and what a resume restores
(``resume.py``), which checkpoints are written (``checkpoints.py``), and the no-grad passes (``evaluate.py``).
"""
from __future__ import annotations

import logging
import math
from typing import Any, Dict, Iterator, Optional

from ..metrics import check_default_metrics, lookup_metric, warn_non_finite_metrics
from ..rng import preserved_rng
from ..sharding import set_sampler_epoch
from .cadence import Cadence
from .checkpoints import CheckpointManager
from .evaluate import evaluate, test_pass
from .optimizers import OptimizerHandle
from .parts import Meters, RunParts
from .resume import EpochCursor, ResumePlan
from .settings import EpochSettings
from .step import TrainStep
from .stops import SIGNAL_REASONS, NonFiniteGuard, StopControl

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
        self.stops = StopControl(parts.context, guard, parts.distributed, self.step.stop_can_change)
        self.cadence = Cadence(parts.params, bool(parts.test_loaders))
        self.cursor: Optional[EpochCursor] = None  # the running epoch's
        self.epoch_results: Dict[str, Any] = {}  # the running epoch's "train" and (last) "valid" metrics, "seconds"

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
                    if self.cadence.validation_due(ctx):
                        self.validate()
                    stops.agree(ctx)
                    if self.cadence.test_due(ctx):
                        self.test_all()
                    self.record_history()
                    fire.on_epoch_end(ctx)
                    self.checkpoints.save_epoch(ctx, last=self.is_last_epoch())
                    if ctx.stop_training:
                        break
        except KeyboardInterrupt:
            stops.interrupted_now(ctx)
            logger.info("training %s; %s holds the last checkpointed state", ctx.stop_reason, self.checkpoints.latest)
        except BaseException as err:
            ctx.exception = err
            raise
        finally:
            write_error = self.finish_writes()  # the last write lands (and is announced) before on_training_end
            stops.closing(ctx)                          # a signal while it landed counts; handlers restored
            ctx.stop_reason = _final_reason(ctx, write_error)
            fire.on_training_end(ctx)
            ctx.exception = None  # for on_training_end only: kept, the exception's frames would hold it in a cycle
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
                if self.checkpoints.saved:                  # a background write landed: announce it on this thread
                    self.announce_saved()
                due = self.checkpoints.mid_epoch_due(ctx, is_last)
                at_step = self.cadence.in_pass(ctx, is_last)  # val_check_interval's step, or max_steps reached
                if stops.end_of_batch(ctx, read_losses=due or at_step):  # a stop, Ctrl-C or a bad loss, on all ranks
                    break
                if at_step:
                    if self.validate_in_pass(epoch):        # the pass ends here (max_steps, or a stop decided there)
                        break
                elif due:
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
        self.epoch_results.update(train=dict(ctx.metrics_dict), seconds=epoch.seconds())
        return complete

    def validate_in_pass(self, epoch: EpochCursor) -> bool:
        """A point inside the pass (val_check_interval's step, or max_steps reached): validate there, checkpoint
        this step; True when the pass ends here, as the run's last (then the epoch is closed like a completed one
        but not checkpointed again: the state of this step is). The validation leaves the random state as it found
        it (a loader iterator draws a seed), so training draws the same numbers with or without it."""
        if self.cadence.validates_in_pass(self.ctx):
            with preserved_rng():
                self.validate(in_pass=True)
            epoch.valid = self.epoch_results["valid"]  # recorded in this step's checkpoint, for the epoch's history
        ends = self.stops.after_step_validation(self.ctx) or self.cadence.steps_done(self.ctx)
        self.checkpoints.save_progress(epoch, final=ends)
        return ends

    def open_epoch(self) -> EpochCursor:
        self.settings.apply()                               # settings written since the last epoch
        self.meters.start_train()
        self.parts.model.train()
        cursor = self.resume.open_epoch(self.parts, self.meters)
        self.epoch_results = {"valid": cursor.valid}  # a validation inside the pass (before a resume) fills it
        return cursor

    def start_pass(self, epoch: EpochCursor) -> None:
        """After on_train_loader_start: the batch count and accumulation of this pass, the sampler's epoch, and a mid-epoch resume's
        lrs (an epoch-start schedule just ran again, but the lr is the checkpoint's)."""
        n_batches, accumulate = self.settings.apply()
        set_sampler_epoch(self.ctx.train_loader, self.ctx.epoch)  # a DistributedSampler's shuffle for this epoch
        self.step.start_epoch(n_batches, accumulate)
        self.cadence.open_epoch(self.ctx.steps_per_epoch)
        epoch.start(n_batches)

    def epochs(self) -> Iterator[int]:
        """Sets context.epoch to each epoch to run, from the first (the checkpoint's on a resume) while it is below
        max_epochs (read each time: a callback may extend the run) and max_steps is not reached."""
        epoch = self.ctx.epoch
        while self.more_epochs(epoch):
            self.ctx.trainer_update(epoch=epoch)
            yield epoch
            epoch += 1

    def is_last_epoch(self) -> bool:
        """At an epoch's checkpoint: no epoch follows (a stop, max_epochs or max_steps reached; a bad max_epochs
        that a callback wrote raises right after the checkpoint)."""
        try:
            return self.ctx.stop_training or not self.more_epochs(self.ctx.epoch + 1)
        except ValueError:
            return True

    def more_epochs(self, epoch: int) -> bool:
        """Whether ``epoch`` runs: below max_epochs (read each time: a callback may extend the run), and max_steps
        not reached. Nothing that runs between an epoch's checkpoint and this check can change the answer, so the
        checkpoint knows whether it is the run's last."""
        return epoch < self.settings.current_max_epochs() and not self.cadence.steps_done(self.ctx)

    # ---- validation, test, history --------------------------------------------------------------------
    def validate(self, in_pass: bool = False) -> None:
        """One pass over the valid loader (EMA weights when EMA is on), best-tracking, and the checkpoints it asks
        for (ckpt_best, save_top_k), written at the next checkpoint (right after, inside a pass: ``in_pass``)."""
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
        self.checkpoints.validated(ctx, self.track_best(), in_pass)

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
        """The test passes; context.metrics_dict is then the epoch's validation metrics again (on_epoch_end reads
        them; the test metrics are in context.test_metrics)."""
        shown = self.ctx.metrics_dict
        for name, loader in self.parts.test_loaders.items():
            test_pass(self.parts, self.meters, name, loader, self.stops.interrupted)
        self.ctx.metrics_dict = shown

    def announce_saved(self) -> None:
        """on_checkpoint_saved for each checkpoint whose files a background write completed since the last call,
        with context.checkpoint_paths listing them (on the training thread)."""
        for paths in self.checkpoints.landed():
            self.ctx.checkpoint_paths = [str(path) for path in paths]
            self.fire.on_checkpoint_saved(self.ctx)

    def finish_writes(self) -> Optional[BaseException]:
        """The last write lands and every finished one is announced; the first error, returned (not raised) so
        that on_training_end still fires."""
        error = self.checkpoints.finish(self.stops.holding_signals)
        try:
            self.announce_saved()
        except BaseException as err:  # an on_checkpoint_saved callback's error: reported like a failed write
            error = error or err
        return error

    def record_history(self) -> None:
        results = self.epoch_results
        entry: Dict[str, Any] = {"epoch": self.ctx.epoch, "lr": self.ctx.epoch_lrs[0], "seconds": results["seconds"]}
        entry.update({f"train/{k}": v for k, v in results["train"].items()})
        entry.update({f"valid/{k}": v for k, v in results["valid"].items()})
        self.ctx.history.append(entry)


def _final_reason(ctx: Any, write_error: Optional[BaseException]) -> str:
    """Why training ended: an exception, a signal (Ctrl-C, SIGTERM), a stop's reason, or "completed"; a failed
    last write counts as an exception unless one is already propagating."""
    if ctx.exception is not None:
        return "exception"
    if isinstance(write_error, KeyboardInterrupt):  # a second signal while waiting for the last write
        return ctx.stop_reason if ctx.stop_reason in SIGNAL_REASONS.values() else "interrupted"
    if write_error is not None:
        ctx.exception = write_error
        return "exception"
    if ctx.stop_reason in SIGNAL_REASONS.values():
        return ctx.stop_reason
    return (ctx.stop_reason or "stopped_by_callback") if ctx.stop_training else "completed"
