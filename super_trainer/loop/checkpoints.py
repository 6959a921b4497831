"""Which checkpoint files are written when (SPEC §3, §7, §8), and their content. The loop calls the *points*
(a validation, an epoch's end, a due step, the run's last step, Ctrl-C, the end of training); the *policy* (latest,
best, the k best, ``ckpt_epoch_N``, every N steps, retention, rank 0 only, ``save_model``, file names) lives here.

Writes go through one background :class:`~super_trainer.checkpoint_writer.CheckpointWriter`: the state is copied
to host memory on the training thread and written (atomically) from the writer's thread, which reports each
finished job in ``saved``; the loop announces them with ``on_checkpoint_saved`` on the training thread.

FSDP2: the full state (weights, optimizer state, EMA) is gathered from every rank's shards by collectives, so every
rank builds the state at every checkpoint point (``gathers``) and rank 0 alone writes it. The files hold the plain
module's state_dict and ``torch.optim``'s own layout, as unsharded training writes them.
"""
from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any, Callable, ContextManager, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

from .. import distributed
from ..callbacks.lr import TorchSchedulerCallback
from ..checkpoint import FORMAT, check_callback_states, epoch_checkpoints_to_prune
from ..checkpoint_writer import CheckpointWriter, copy_to_host
from ..context import PhaseContext
from ..fsdp import full_state_dicts, is_fsdp2
from ..metrics import lookup_metric
from ..rng import get_rng_state
from .parts import Meters, RunParts
from .resume import EpochCursor, plain_params
from .shards import ShardStore
from .stops import StopControl
from .top_k import TopK

__all__ = ["CheckpointManager", "LATEST"]

logger = logging.getLogger("super_trainer")

LATEST = "ckpt_latest.pth"


class CheckpointManager:
    """Writes the run's checkpoints into ``ckpt_dir`` (rank 0 only; none when ``save_model`` is False)."""

    def __init__(self, parts: RunParts, meters: Meters, ckpt_dir: Path, kept_best: Sequence[Dict[str, Any]] = ()
                 ) -> None:
        self.parts, self.meters, self.ckpt_dir = parts, meters, ckpt_dir
        self.params = params = parts.params
        self.every = params.save_ckpt_every_n_steps or 0  # mid-epoch checkpoints every N optimizer steps
        self.enabled = bool(params.save_model) and distributed.is_main_process()
        # FSDP2: every rank takes part in gathering the state (a collective); only rank 0 (enabled) writes it
        self.fsdp2 = is_fsdp2(parts.net)  # fixed for the run: asked once, not per checkpoint (a walk of the modules)
        self.gathers = bool(params.save_model) and self.fsdp2
        # fsdp_params.checkpoint: sharded — every rank writes its shards instead of gathering (loop/shards.py)
        self.shards = ShardStore(ckpt_dir) if self.gathers and parts.distributed and \
            params.fsdp_params["checkpoint"] == "sharded" else None
        if self.shards is None and params.save_model and params.fsdp_params["checkpoint"] == "sharded" \
                and distributed.is_main_process():
            warnings.warn("training_params.fsdp_params.checkpoint: 'sharded' applies to an FSDP2 model under "
                          "torchrun only; this run writes full checkpoints", stacklevel=5)
        self.writer = CheckpointWriter(report_written=self.enabled)
        self.saved = self.writer.written  # the paths of each finished write, until the loop announces them
        self.top_k = TopK(params.save_top_k if self.enabled else None, params.metric_to_watch,
                          params.greater_metric_to_watch_is_better, ckpt_dir, kept_best)
        self.states_checked = False  # callback states passed the weights_only check
        self.last_step = -1  # global_step of the last checkpoint written (epoch end or mid-epoch)
        self.initial: Optional[Dict[str, Any]] = None  # a fresh run's first state, until another checkpoint is saved
        self.best_due = False  # the last validation improved metric_to_watch: the next checkpoint writes ckpt_best
        self.top_due: Optional[tuple] = None  # (file, files to delete) the next checkpoint writes for save_top_k
        self.closed_at_step = False  # the pass ended at a step checkpointed there: the epoch's close writes nothing

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
        net, optimizers = self._weights()
        sharded = self.shards.write(parts, context.global_step) if self.shards is not None else None  # collective
        return {
            "format": FORMAT,
            "net": net,
            "epoch": epochs_done,
            "global_step": context.global_step,
            "batches_seen": context.batches_seen,
            "acc": lookup_metric(last, self.params.metric_to_watch),
            "best_metric": context.best_metric,
            "best_epoch": context.best_epoch,
            "metrics": _plain_metrics(last),
            "history": context.history,
            **optimizers,  # optimizer_type, optimizer_state_dict (by name with several)
            "scaler_state_dict": parts.scaler.state_dict() if parts.scaler is not None else None,
            "ema_net": parts.ema.state_dict() if parts.ema is not None and sharded is None else None,
            "callbacks": parts.callbacks.state_dict(),
            "rng_state": get_rng_state(),
            "lr_scheduler_state": schedulers or None,
            "top_k": self.top_k.state(),
            "training_params": plain_params(self.params),  # a resume lists what differs
            "world_size": distributed.world_size(),  # a mid-epoch record holds one share per rank
            **({"sharded": sharded} if sharded else {}),  # the shard dir holding net, optimizer and EMA
        }

    def _weights(self) -> Tuple[Optional[Dict[str, Any]], Dict[str, Any]]:
        """``net`` and the optimizer entries; for FSDP2 gathered to full tensors on rank 0 (a collective: None on
        the other ranks). The EMA's ``state_dict()`` gathers alike (ShardedModelEMA). With sharded checkpoints
        both are None: the shards hold them."""
        parts = self.parts
        if self.shards is not None:
            return None, {"optimizer_type": type(parts.optimizer).__name__, "optimizer_state_dict": None}
        if not self.fsdp2:
            return parts.net.state_dict(), parts.optimizers.checkpoint_state()
        net, optimizer = full_state_dicts(parts.net, parts.optimizer)  # several optimizers: refused with FSDP2
        return net, {"optimizer_type": type(parts.optimizer).__name__, "optimizer_state_dict": optimizer}

    # ---- the points the loop calls ----------------------------------------------------------------
    def keep_initial(self, context: PhaseContext) -> None:
        """A fresh run's state before its first step, copied to host memory now and written only if training ends
        before any other checkpoint (a stop, Ctrl-C or an exception in the first epoch), so ckpt_latest is loadable
        whatever happens without a write at every start. The first check of the callbacks' states runs here."""
        if self.enabled:
            state = self.state(context.epoch)
            params = state.pop("training_params")  # built for this state alone: nothing changes it, no copy needed
            self.initial = dict(copy_to_host(state), training_params=params)
        elif self.gathers:
            self.state(context.epoch)  # this rank's part of rank 0's gather

    def validated(self, context: PhaseContext, improved: bool, in_pass: bool) -> None:
        """A validation ended: the next checkpoint writes ckpt_best when it improved, and a save_top_k file when
        its value is among the k best (named with the step when ``in_pass``, inside an epoch)."""
        self.best_due = improved
        value = lookup_metric(self.meters.last_valid, self.params.metric_to_watch)
        self.top_due = self.top_k.offer(value, context.epoch, context.global_step if in_pass else None)

    def save_epoch(self, context: PhaseContext, last: bool = False) -> None:
        """At a completed epoch's end: ckpt_latest always; ckpt_best / the top-k file when the epoch's validation
        asks; ckpt_epoch_N when N is listed. Nothing when the pass ended at a step already checkpointed there.
        ``last``: no epoch follows, so :meth:`finish` writes it (a small state on the training thread)."""
        if self.closed_at_step:
            self.closed_at_step = False
            return
        self.last_step, self.initial = context.global_step, None
        if not (self.enabled or self.gathers):
            return
        done = context.epoch + 1
        state = self.state(done)
        if not self.enabled:
            return
        paths, remove = [self.latest], []
        if done in self.params.save_ckpt_epoch_list:
            paths.append(self.ckpt_dir / f"ckpt_epoch_{done}.pth")
            self.writer.flush()  # the previous ckpt_epoch file is on disk before counting what to prune
            remove = epoch_checkpoints_to_prune(self.ckpt_dir, self.params.max_keep_ckpts, adding=paths[-1])
        self._write(state, paths, remove, last)

    def mid_epoch_due(self, context: PhaseContext, is_last: bool) -> bool:
        """A mid-epoch checkpoint is due once global_step reaches a new multiple of save_ckpt_every_n_steps (not
        on the epoch's last batch: the epoch-end checkpoint follows). Asked after every batch, it also raises a
        failed background write there, on the training thread (one attribute read per batch)."""
        if self.writer.failure is not None:
            self.writer.flush()  # raises it
        step = context.global_step
        return bool(self.every) and not is_last and step % self.every == 0 and step != self.last_step

    def save_progress(self, epoch: EpochCursor, final: bool = False, last: bool = False) -> None:
        """ckpt_latest in the middle of an epoch (and ckpt_best / a top-k file after a validation there): the state
        after ``epoch.done`` batches of the running epoch, with what a resume needs to continue exactly (SPEC §7
        "Mid-epoch checkpoints"). ``final``: the pass ends here (max_steps, or a stop decided at a validation), so
        the epoch's close writes nothing more (it is written in the background still: a test pass may follow).
        ``last``: nothing follows but the end of training (a signal), so :meth:`finish` writes it."""
        context = self.parts.context
        self.last_step, self.initial, self.closed_at_step = context.global_step, None, final
        if not self.params.save_model:
            return
        progress = epoch.record()  # FSDP2: gathers the gradients of a cut window (a collective)
        if self.parts.distributed:  # every rank's own loss items, train metrics, RNG (and DDP gradients) onto rank 0
            progress["ranks"] = distributed.gather_to_main(copy_to_host(epoch.own_part(progress)))
        if not (self.enabled or self.gathers):
            return
        state = self.state(epochs_done=context.epoch)
        state["epoch_progress"] = progress
        if self.enabled:
            self._write(state, [self.latest], last=last)

    def _write(self, state: Dict[str, Any], paths: List[Path], remove: List[Path] = (), last: bool = False) -> None:
        """Hand ``state`` to the writer for ``paths`` plus ckpt_best and the top-k file a validation asked for;
        files beyond max_keep_ckpts and save_top_k are deleted once the new ones are written. ``last``: the
        writer holds it for :meth:`finish`."""
        paths, remove = list(paths), list(remove)
        jobs = [(state, paths)]
        if self.top_due is not None:  # a full resumable checkpoint: the training weights, as ckpt_latest
            name, evicted = self.top_due
            paths.append(self.ckpt_dir / name)
            remove += [self.ckpt_dir / old for old in evicted]
        best = self.ckpt_dir / self.params.ckpt_best_name
        if self.best_due and state["ema_net"] is not None:  # best holds the EMA weights as its net
            jobs.append((dict(state, net=state["ema_net"]), [best]))
        elif self.best_due and state.get("sharded") and self.parts.ema is not None:  # the shards' "ema" entry
            jobs.append((dict(state, sharded_net="ema"), [best]))
        elif self.best_due:
            paths.append(best)
        self.best_due, self.top_due = False, None
        # copied (or serialized) now, since training may change the state next; written in the background, or
        # the run's last by finish(), which waits for it anyway
        self.writer.save_many(jobs, remove=remove, hold=last)

    def landed(self) -> Iterator[List[Path]]:
        """The paths of each checkpoint whose files are complete on disk since the last call, oldest first."""
        while self.saved:
            yield self.saved.popleft()
        if self.shards is not None and self.enabled:
            self.shards.prune()  # shard dirs no checkpoint file names any more

    def at_interrupt(self, context: PhaseContext, epoch: EpochCursor, stops: StopControl) -> None:
        """A signal (Ctrl-C, SIGTERM) stopped the pass: ckpt_latest at the last finished batch, if the state there
        is consistent and finite."""
        if epoch.done is None:
            logger.warning("Ctrl-C or SIGTERM came during a backward pass or optimizer step; %s holds the last "
                           "checkpointed state", self.latest)
        elif epoch.done > epoch.resumed_at and stops.finite_everywhere(context, "the Ctrl-C/SIGTERM checkpoint"):
            self.save_progress(epoch, last=True)

    def finish(self, holding_signals: Callable[[], ContextManager[Any]]) -> Optional[BaseException]:
        """Write the initial state if no other checkpoint was saved, wait for the write in flight and write the
        held last one (a second Ctrl-C or SIGTERM waits for that write's end: ``holding_signals``); return an
        exception instead of raising it, so that on_training_end still fires."""
        try:
            if self.initial is not None:
                self.writer.save_many([(self.initial, [self.latest])], hold=True, on_host=True)  # copied at start
                self.initial = None
            self.writer.wait()  # a background write: a second signal interrupts this wait (the write goes on)
            with holding_signals():
                self.writer.flush()  # the held last checkpoint: milliseconds that a second signal must not cut
            self.writer.close()
        except KeyboardInterrupt as err:
            logger.warning("Ctrl-C while waiting for the last checkpoint write; it still completes before exit")
            return err
        except BaseException as err:
            return err
        return None


def _plain_metrics(metrics: Mapping[str, Any]) -> Dict[str, Any]:
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float, list, str))}
