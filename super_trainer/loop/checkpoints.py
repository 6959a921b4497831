"""Which checkpoint files are written when (SPEC §3, §7), and their content. The loop calls the *points*
(an epoch's end, a due step, Ctrl-C, the end of training); the *policy* (latest, best, ``ckpt_epoch_N``, every
N steps, retention, rank 0 only, ``save_model``, file names) lives here.

Writes go through one background :class:`~super_trainer.checkpoint_writer.CheckpointWriter`: the state is copied
to host memory on the training thread and written (atomically) from the writer's thread.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Dict, Mapping, Optional

from .. import distributed
from ..callbacks.lr import TorchSchedulerCallback
from ..checkpoint import FORMAT, check_callback_states, epoch_checkpoints_to_prune
from ..checkpoint_writer import CheckpointWriter, copy_to_host
from ..context import PhaseContext
from ..metrics import lookup_metric
from ..rng import get_rng_state
from .parts import Meters, RunParts
from .resume import EpochCursor
from .stops import StopControl

__all__ = ["CheckpointManager", "LATEST"]

logger = logging.getLogger("super_trainer")

LATEST = "ckpt_latest.pth"


class CheckpointManager:
    """Writes the run's checkpoints into ``ckpt_dir`` (rank 0 only; none when ``save_model`` is False)."""

    def __init__(self, parts: RunParts, meters: Meters, ckpt_dir: Path) -> None:
        self.parts, self.meters, self.ckpt_dir = parts, meters, ckpt_dir
        self.params = parts.params
        self.every = parts.params.save_ckpt_every_n_steps or 0  # mid-epoch checkpoints every N optimizer steps
        self.enabled = bool(parts.params.save_model) and distributed.is_main_process()
        self.writer = CheckpointWriter()
        self.states_checked = False  # callback states passed the weights_only check
        self.last_step = -1  # global_step of the last checkpoint written (epoch end or mid-epoch)
        self.initial: Optional[Dict[str, Any]] = None  # a fresh run's first state, until another checkpoint is saved

    @property
    def latest(self) -> Path:
        return self.ckpt_dir / LATEST

    def state(self, epochs_done: int) -> Dict[str, Any]:
        """The checkpoint dict of SPEC §3 for the state right now."""
        parts, context = self.parts, self.parts.context
        if not self.states_checked:
            check_callback_states(parts.callbacks)  # fail at the first write, not at a resume months later
            self.states_checked = True
        schedulers = {cb.state_key: cb.state_dict() for cb in parts.callbacks.callbacks
                      if isinstance(cb, TorchSchedulerCallback)}
        last = self.meters.last_valid
        return {
            "format": FORMAT,
            "net": parts.net.state_dict(),
            "epoch": epochs_done,
            "global_step": context.global_step,
            "batches_seen": context.batches_seen,
            "acc": lookup_metric(last, self.params.metric_to_watch),
            "best_metric": context.best_metric,
            "best_epoch": context.best_epoch,
            "metrics": _plain_metrics(last),
            "history": context.history,
            "optimizer_type": type(parts.optimizer).__name__,
            "optimizer_state_dict": parts.optimizer.state_dict(),
            "scaler_state_dict": parts.scaler.state_dict() if parts.scaler is not None else None,
            "ema_net": parts.ema.state_dict() if parts.ema is not None else None,
            "callbacks": parts.callbacks.state_dict(),
            "rng_state": get_rng_state(),
            "lr_scheduler_state": schedulers or None,
        }

    # ---- the points the loop calls ----------------------------------------------------------------
    def keep_initial(self, context: PhaseContext) -> None:
        """A fresh run's state before its first step, copied to host memory now and written only if training ends
        before any other checkpoint (a stop, Ctrl-C or an exception in the first epoch), so ckpt_latest is loadable
        whatever happens without a write at every start. The first check of the callbacks' states runs here."""
        if self.enabled:
            self.initial = copy_to_host(self.state(context.epoch))

    def save_epoch(self, context: PhaseContext, improved: bool) -> None:
        """At a completed epoch's end: ckpt_latest always; ckpt_best when improved; ckpt_epoch_N when N is listed."""
        self.last_step, self.initial = context.global_step, None
        if not self.enabled:
            return
        done = context.epoch + 1
        state = self.state(done)
        paths, remove = [self.latest], []
        if done in self.params.save_ckpt_epoch_list:
            paths.append(self.ckpt_dir / f"ckpt_epoch_{done}.pth")
            self.writer.flush()  # the previous ckpt_epoch file is on disk before counting what to prune
            remove = epoch_checkpoints_to_prune(self.ckpt_dir, self.params.max_keep_ckpts, adding=paths[-1])
        jobs = [(state, paths)]
        best = self.ckpt_dir / self.params.ckpt_best_name
        if improved and state["ema_net"] is not None:  # best holds the EMA weights as its net
            jobs.append((dict(state, net=state["ema_net"]), [best]))
        elif improved:
            paths.append(best)
        # copied now (training may change the state next), written in the background; files beyond
        # max_keep_ckpts are deleted once the new ones are written
        self.writer.save_many(jobs, remove=remove)

    def mid_epoch_due(self, context: PhaseContext, is_last: bool) -> bool:
        """A mid-epoch checkpoint is due once global_step reaches a new multiple of save_ckpt_every_n_steps (not
        on the epoch's last batch: the epoch-end checkpoint follows)."""
        step = context.global_step
        return bool(self.every) and not is_last and step % self.every == 0 and step != self.last_step

    def save_progress(self, epoch: EpochCursor) -> None:
        """ckpt_latest in the middle of an epoch: the state after ``epoch.done`` batches of the running epoch, with
        what a resume needs to continue exactly (SPEC §7 "Mid-epoch checkpoints")."""
        context = self.parts.context
        self.last_step, self.initial = context.global_step, None
        if not self.enabled:
            return
        state = self.state(epochs_done=context.epoch)
        state["epoch_progress"] = epoch.record()
        self.writer.save(state, self.latest)  # copied now, written in the background

    def at_interrupt(self, context: PhaseContext, epoch: EpochCursor, stops: StopControl) -> None:
        """Ctrl-C stopped the pass: ckpt_latest at the last finished batch, if the state there is consistent."""
        if epoch.done is None:
            logger.warning("Ctrl-C came during a backward pass or optimizer step; %s holds the last checkpointed "
                           "state", self.latest)
        elif epoch.done > epoch.resumed_at and stops.finite_before(context, "the Ctrl-C checkpoint"):
            self.save_progress(epoch)

    def finish(self) -> Optional[BaseException]:
        """Write the initial state if no other checkpoint was saved, wait for the write in flight; return its
        exception (already logged by the writer) instead of raising it, so that on_training_end still fires."""
        try:
            if self.initial is not None:
                self.writer.save(self.initial, self.latest)
                self.initial = None
            self.writer.close()
        except KeyboardInterrupt as err:
            logger.warning("Ctrl-C while waiting for the last checkpoint write; it still completes before exit")
            return err
        except BaseException as err:
            return err
        return None


def _plain_metrics(metrics: Mapping[str, Any]) -> Dict[str, Any]:
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float, list, str))}
