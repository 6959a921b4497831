"""``PhaseContext``: the one mutable object every event receives, with every field the trainer writes declared.

Each field is one of three kinds, so that no write is ever silently ignored (SPEC §7, §8):

- **honoured**: the trainer reads the field back every time it needs it, so a callback's write takes effect
  (``criterion`` from the next batch, ``train_loader`` from the next pass, ``inputs`` at on_train_batch_start
  changes what the model sees, ``stop_training`` stops, ...);
- **locked**: the trainer owns the field while training (``net``, ``optimizer``, ``ckpt_dir``, the counters, ...);
  replacing it raises AttributeError with advice (changing an object's contents is fine);
- **output**: a value the trainer sets before an event for the callbacks to read (``preds``, ``loss_log_items``,
  ``exception``); a callback may replace it for the callbacks after it in the same event.

Callbacks may also add attributes of their own (``update_context`` accepts any name).
This module imports nothing from super_trainer.
"""
from __future__ import annotations

from typing import Any, Dict, Tuple

__all__ = ["PhaseContext", "HONOURED", "LOCKED", "OUTPUTS", "FIELD_DOCS"]

#: Fields the trainer reads back: a callback's write takes effect.
HONOURED: Dict[str, str] = {
    "criterion": "the loss function; a new one serves training and validation from the next batch",
    "train_loader": "the train loader; a new one is used from the next epoch's pass (or this one, when written "
                    "at on_train_loader_start)",
    "valid_loader": "the validation loader; a new one is used from the next validation pass",
    "inputs": "the batch's inputs, on the device; replaced at on_train_batch_start, the model sees the new ones",
    "target": "the batch's target, on the device; replaced at on_train_batch_start, the loss sees the new one",
    "additional_batch_items": "the batch's extra items (a dict), on the device",
    "loss": "the criterion's value for the batch (unscaled); backward() uses what this holds after "
            "on_train_batch_loss_end",
    "metrics_dict": "the metrics of the pass that just ended: train at on_train_loader_end, validation at "
                    "on_validation_loader_end, test at on_test_loader_end; entries added there are kept (history, "
                    "best-tracking, result)",
    "global_step": "optimizer steps taken (0 before the first)",
    "batches_seen": "train batches run so far, resumes included",
    "max_epochs": "epochs to train (kept equal to training_params.max_epochs); a write at on_train_loader_start "
                  "applies to that epoch, elsewhere from the next: schedule horizons follow",
    "stop_training": "set True to stop (during a batch: at once; elsewhere: after the epoch)",
    "stop_reason": "why training stopped; a callback that stops may set it (e.g. 'early_stop')",
    "skip_step": "set True at on_train_batch_gradient_step_start to skip that optimizer step",
}

#: Fields the trainer owns while training: replacing them raises.
LOCKED: Dict[str, str] = {
    "net": "the model the forward pass calls (the user's module, or its DDP / torch.compile wrapper)",
    "optimizer": "the optimizer (the first one with several); edit its param_groups or add groups instead of "
                 "replacing it",
    "optimizers": "{name: handle} of every optimizer ('default' for one): handle.optimizer, handle.param_groups, "
                  "and handle.update(loss) inside a train_step",
    "device": "the torch.device training runs on",
    "experiment_name": "the experiment's name",
    "ckpt_dir": "the run dir, <ckpt_root_dir>/<experiment_name>/<run id>: checkpoints, logs and the resolved "
                "params go here",
    "sg_logger": "the logger other callbacks write to (add_scalar, add_text, ...)",
    "training_params": "the resolved training_params (a dict; see docs/events.md for which entries may change)",
    "checkpoint_params": "the recipe's checkpoint_params (recipe runs)",
    "architecture": "the recipe's architecture (recipe runs)",
    "arch_params": "the recipe's arch_params (recipe runs)",
    "metric_to_watch": "the metrics_dict key that decides ckpt_best and on_validation_end_best_epoch",
    "train_metrics": "{title: torchmetrics Metric} computed on train batches",
    "valid_metrics": "{title: torchmetrics Metric} computed on validation batches",
    "test_metrics": "{loader name: metrics_dict} of the test passes run so far",
    "ema_model": "the ModelEMA (ema_model.ema is the averaged model), or None",
    "lr_warmup_epochs": "training_params.lr_warmup_epochs",
    "rank": "this process's rank (0 when not distributed)",
    "world_size": "the number of processes (1 when not distributed)",
    "epoch": "the running epoch, 0-based",
    "batch_idx": "the running batch's index in its pass, 0-based",
    "steps_per_epoch": "optimizer steps per epoch (None when the train loader has no len())",
    "total_steps": "optimizer steps of the whole run: steps_per_epoch * max_epochs, capped by max_steps (None when "
                   "unknown)",
    "epoch_start_step": "global_step when the running epoch began (step-based schedules count from it)",
    "best_metric": "the best metric_to_watch value so far",
    "best_epoch": "the epoch of best_metric (already the current epoch in on_validation_end_best_epoch)",
    "history": "one dict per completed epoch (as TrainingResult.history)",
    "epoch_lrs": "each param group's lr during the epoch's training pass (read before epoch-end schedules)",
    "test_loader": "the test loader of the running test pass",
    "test_loader_name": "the name of the running test pass's loader",
    # SuperGradients' names, read by SG's own callbacks (SPEC §8)
    "loss_logging_items_names": "the loss's metrics_dict names (SG), once the loss has named them",
    "metrics_compute_fn": "the running pass's MetricCollection (SG): train, validation or test metrics",
    "loss_avg_meter": "the running pass's loss average (SG's LossAverageMeter API: .average, .update)",
    "ddp_silent_mode": "True on ranks other than 0, which neither log nor write (SG)",
}

#: Values the trainer sets for the callbacks of one event to read.
OUTPUTS: Dict[str, str] = {
    "preds": "the model's output for the batch",
    "loss_log_items": "the batch's detached loss items: the loss, or the (K,) components of a tuple loss",
    "exception": "the exception that ended training, at on_training_end (None otherwise)",
    "optimizer_name": "the optimizer a train_step is updating (context.optimizers[name].update(loss)), at that "
                      "update's loss, backward and step events; None for the trainer's own update",
    "checkpoint_paths": "at on_checkpoint_saved: the paths (str) of the checkpoint files just completed on disk",
}

FIELD_DOCS: Dict[str, str] = {**HONOURED, **LOCKED, **OUTPUTS}

_OWNED = "_trainer_owned"  # the __dict__ entry holding the locked fields' values
_LOCKED_FLAG = "_trainer_owned_locked"


class _TrainerOwned:
    """A locked context field: readable, its contents changeable, but replacing the object during training
    raises, because the trainer (and its wrappers, the EMA, the LR schedules) keeps using what it was given."""

    def __init__(self, advice: str) -> None:
        self.advice = advice

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, context: Any, owner: type) -> Any:
        if context is None:
            return self
        return context.__dict__[_OWNED].get(self.name)

    def __set__(self, context: Any, value: Any) -> None:
        owned = context.__dict__[_OWNED]
        if context.__dict__.get(_LOCKED_FLAG) and value is not owned.get(self.name):
            raise AttributeError(f"context.{self.name} cannot be replaced during training (the trainer owns it: "
                                 f"{LOCKED[self.name]}); {self.advice}")
        owned[self.name] = value


_READ_ONLY = "it is set by the trainer; read it, or keep your own value on your callback"


class PhaseContext:
    """The one mutable object every event receives (SPEC §1).

    Created once per ``Trainer.train()`` call. All fields are None until set (``stop_training`` and ``skip_step``
    are False); ``epoch`` and ``batch_idx`` are 0-based, ``global_step`` counts optimizer steps taken.
    ``FIELDS`` lists every field with a one-line description; see the module docstring for which writes take
    effect (honoured), which raise during training (locked) and which are per-event outputs.
    """

    net = _TrainerOwned("change its contents instead (net.load_state_dict(...), or edit its modules in place)")
    optimizer = _TrainerOwned("change its contents instead (optimizer.load_state_dict(...), edit "
                              "optimizer.param_groups, or optimizer.add_param_group(...))")
    ckpt_dir = _TrainerOwned("the run dir is chosen before training starts (Trainer(ckpt_root_dir=..., "
                             "experiment_name=...) and training_params.run_id)")
    training_params = _TrainerOwned("change its entries instead (see docs/events.md for which take effect)")
    ema_model = _TrainerOwned("change its contents instead (ema_model.ema.load_state_dict(...))")

    FIELDS: Tuple[str, ...] = tuple(FIELD_DOCS)

    def __init__(self, **kwargs: Any) -> None:
        # every field None: the locked ones in the owned dict, the others as plain attributes (set directly: one
        # dict update instead of a setattr per field)
        self.__dict__[_OWNED] = dict.fromkeys(LOCKED)
        self.__dict__.update(_PLAIN_FIELDS)
        self.stop_training = False
        self.skip_step = False
        self.epoch_start_step = 0
        self.update_context(**kwargs)

    def update_context(self, **kwargs: Any) -> None:
        """Set any attributes, declared fields or new ones."""
        for name, value in kwargs.items():
            setattr(self, name, value)

    def lock_trainer_owned(self, locked: bool = True) -> None:
        """From now on (the trainer calls this before on_training_start) the locked fields cannot be replaced."""
        self.__dict__[_LOCKED_FLAG] = locked

    def trainer_update(self, **fields: Any) -> None:
        """The trainer's own writes to the fields it owns (counters, best metric, ...). Not for callbacks."""
        owned = self.__dict__[_OWNED]
        for name, value in fields.items():
            if name not in owned:
                raise AttributeError(f"context.{name} is not a trainer-owned field")
            owned[name] = value

    def owned_fields(self) -> Dict[str, Any]:
        """The dict holding the locked fields' values (the loop writes per-batch counters straight into it)."""
        return self.__dict__[_OWNED]

    def __repr__(self) -> str:
        shown = ", ".join(f"{k}={getattr(self, k)!r}" for k in ("epoch", "batch_idx", "global_step", "loss"))
        return f"PhaseContext({shown})"


def _declare_locked_fields() -> None:
    """Every locked field without its own advice above becomes a read-only (during training) field."""
    for name in LOCKED:
        if not isinstance(PhaseContext.__dict__.get(name), _TrainerOwned):
            field = _TrainerOwned(_READ_ONLY)
            setattr(PhaseContext, name, field)
            field.__set_name__(PhaseContext, name)


_declare_locked_fields()
_PLAIN_FIELDS = dict.fromkeys(name for name in PhaseContext.FIELDS if name not in LOCKED)
