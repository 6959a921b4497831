"""Hook names that are not super_trainer events: the warning for a callback method the trainer will never call,
naming the event that does its job (Lightning's, Keras' and HF's names are mapped by hand)."""
from __future__ import annotations

import difflib
import warnings
import weakref
from typing import Dict, Sequence, Set, Tuple

__all__ = ["FOREIGN_HOOKS", "warn_unknown_hooks"]

#: Hook names from other trainers (Lightning, Keras, HF) and the event that does their job here.
FOREIGN_HOOKS: Dict[str, str] = {
    "on_fit_start": "on_training_start", "on_train_start": "on_training_start",
    "on_train_begin": "on_training_start", "on_fit_end": "on_training_end", "on_train_end": "on_training_end",
    "on_exception": "on_training_end (context.exception is set)",
    "on_train_epoch_start": "on_train_loader_start", "on_epoch_begin": "on_train_loader_start",
    "on_epoch_start": "on_train_loader_start", "on_train_epoch_end": "on_train_loader_end or on_epoch_end",
    "on_train_batch_begin": "on_train_batch_start", "on_before_backward": "on_train_batch_loss_end",
    "on_after_backward": "on_train_batch_backward_end",
    "on_before_optimizer_step": "on_train_batch_gradient_step_start",
    "on_before_zero_grad": "on_train_batch_gradient_step_end", "on_step_end": "on_train_batch_gradient_step_end",
    "on_validation_start": "on_validation_loader_start", "on_validation_epoch_start": "on_validation_loader_start",
    "on_validation_end": "on_validation_loader_end", "on_validation_epoch_end": "on_validation_loader_end",
    "on_test_start": "on_test_loader_start", "on_test_epoch_start": "on_test_loader_start",
    "on_test_end": "on_test_loader_end", "on_test_epoch_end": "on_test_loader_end",
    "on_save_checkpoint": "state_dict() (or on_checkpoint_saved, once the files are written)",
    "on_load_checkpoint": "load_state_dict(state)",
}
_warned_hooks: Set[Tuple[type, str]] = set()
_hook_checked_classes: "weakref.WeakSet[type]" = weakref.WeakSet()


def warn_unknown_hooks(callback: object, events: Sequence[str]) -> None:
    """Warn once per class and name about ``on_*`` methods that are not events: the trainer never calls them
    (typically a hook name from another trainer, e.g. Lightning's ``on_train_epoch_end``). ``events``: the event
    names (``base.EVENTS``)."""
    cls = type(callback)
    if cls in _hook_checked_classes:  # dir() of a class is ~10 us; a run builds the same classes again
        return
    _hook_checked_classes.add(cls)
    for name in dir(cls):
        if not name.startswith("on_") or name in events or (cls, name) in _warned_hooks:
            continue
        if not callable(getattr(cls, name, None)):
            continue
        _warned_hooks.add((cls, name))
        closest = FOREIGN_HOOKS.get(name) or next(iter(difflib.get_close_matches(name, events, n=1, cutoff=0)), "")
        warnings.warn(f"{cls.__name__}.{name} is not a super_trainer event and will never be called; "
                      f"the closest event is {closest} (events: docs/events.md)", stacklevel=4)
