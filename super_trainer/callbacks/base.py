"""Events, the context they carry, and the handler that dispatches them.

The trainer fires these events, in this order (SPEC §1, §8)::

    on_optimizer_built                           # optimizer(s) and param groups built; before a checkpoint is restored
    on_training_start
      for each epoch:
        on_train_loader_start
          for each train batch:
            on_train_batch_start                 # batch on device: inputs, target, batch_idx set
            on_train_batch_loss_end              # preds, loss, loss_log_items set
            on_train_batch_backward_end          # after backward()
            on_train_batch_gradient_step_start   # only on stepping batches; before optimizer.step
            on_train_batch_gradient_step_end     # only on stepping batches; after optimizer.step
            # a train_step that updates through context.optimizers[name].update(loss) fires the four events
            # above once per update, with context.optimizer_name set (SPEC §8 "Several optimizers")
            on_train_batch_end
        on_train_loader_end                      # metrics_dict holds this epoch's train metrics
        on_validation_loader_start               # only on validation epochs
          for each valid batch: on_validation_batch_start, on_validation_batch_end
        on_validation_loader_end                 # metrics_dict holds this epoch's validation metrics
        on_validation_end_best_epoch             # only when metric_to_watch improved
        on_test_loader_start                     # once per test loader, when a test is due (the last epoch,
          for each test batch: on_test_batch_start, on_test_batch_end      # or every run_test_freq epochs)
        on_test_loader_end
        on_epoch_end                             # once per completed epoch, before its checkpoints
      on_checkpoint_saved                        # a checkpoint's files are complete on disk (written in the
                                                 # background): seen after a train batch or before on_training_end
    on_training_end                              # always exactly once

docs/events.md has the full table, including what a stop, an exception and Ctrl-C do.
"""
from __future__ import annotations

import enum
import weakref
from typing import Any, Callable, Dict, FrozenSet, Iterable, List, Optional, Sequence, Tuple, Union

from ..context import PhaseContext
from .hook_names import warn_unknown_hooks

__all__ = [
    "EVENTS",
    "Callback",
    "CallbackHandler",
    "Phase",
    "PhaseCallback",
    "PhaseContext",
    "Priority",
    "parse_phase",
    "resolve_priority",
]

#: Every event, in the order the trainer first fires them.
EVENTS: Tuple[str, ...] = (
    "on_optimizer_built",
    "on_training_start",
    "on_train_loader_start",
    "on_train_batch_start",
    "on_train_batch_loss_end",
    "on_train_batch_backward_end",
    "on_train_batch_gradient_step_start",
    "on_train_batch_gradient_step_end",
    "on_train_batch_end",
    "on_train_loader_end",
    "on_validation_loader_start",
    "on_validation_batch_start",
    "on_validation_batch_end",
    "on_validation_loader_end",
    "on_validation_end_best_epoch",
    "on_test_loader_start",
    "on_test_batch_start",
    "on_test_batch_end",
    "on_test_loader_end",
    "on_epoch_end",
    "on_checkpoint_saved",
    "on_training_end",
)


class Priority(enum.IntEnum):
    """Order in which callbacks receive an event: lower runs first. The default is NORMAL."""

    VERY_HIGH = 10
    HIGH = 30
    ABOVE_NORMAL = 40
    NORMAL = 50
    BELOW_NORMAL = 60
    LOW = 70
    VERY_LOW = 90


def resolve_priority(value: Any, owner: object = None) -> int:
    """Turn a priority given as an int, a name ("HIGH", case-insensitive) or a Priority into an int."""
    if isinstance(value, bool):  # bool is an int subclass, but True is never a meant priority
        pass
    elif isinstance(value, int):
        return int(value)
    elif isinstance(value, str) and value.upper() in Priority.__members__:
        return int(Priority[value.upper()])
    names = ", ".join(Priority.__members__)
    who = f" of {type(owner).__name__}" if owner is not None else ""
    raise ValueError(f"priority{who} must be an int or one of {names}; got {value!r}")


class Callback:
    """Base class of everything that reacts to training events.

    Override only the events you need: the handler sends an event only to callbacks that override it,
    so an idle callback costs nothing per batch. Each method receives the shared :class:`PhaseContext`.

    Optional attributes and methods:

    - ``priority`` (class or instance attribute): int, name or :class:`Priority`; lower runs first.
    - ``metric_names`` (class or instance attribute): the metrics_dict keys this callback adds at
      on_validation_loader_end, so ``metric_to_watch`` may name them (checked before training).
    - ``state_dict()`` / ``load_state_dict(state)``: state saved in every checkpoint and restored on
      resume, stored under ``state_key`` (default: the class name; override it when you train with two
      stateful instances of one class). State must be made of tensors, numbers, strings, lists, dicts.
    """

    priority: Union[int, str, Priority] = Priority.NORMAL
    metric_names: Sequence[str] = ()

    @property
    def state_key(self) -> str:
        """Key of this callback's state in a checkpoint's ``callbacks`` dict."""
        return type(self).__qualname__

    def on_optimizer_built(self, context: PhaseContext) -> None:
        """Once, first: right after the optimizer(s) and their param groups are built, before any checkpoint is
        restored (so a resume finds what is added here) and before on_training_start. Add or change param groups
        here (``context.optimizer.add_param_group``; with several optimizers ``context.optimizers[name]``); a
        group's lr when added is its lr0 for every schedule. net, optimizer, optimizers, criterion, loaders,
        training_params and device are set; the checkpoint's weights and counters are not loaded yet."""

    def on_training_start(self, context: PhaseContext) -> None:
        """Once, before the first epoch. optimizer, net, criterion, loaders, ckpt_dir, sg_logger,
        training_params, metric_to_watch, device are set; epoch is the first epoch to run (>0 on resume)."""

    def on_train_loader_start(self, context: PhaseContext) -> None:
        """At the start of each epoch's training pass (epoch-based warmup sets the lr here)."""

    def on_train_batch_start(self, context: PhaseContext) -> None:
        """Batch already on the device: inputs, target, batch_idx, additional_batch_items set.
        Replacing context.inputs / context.target changes what the model and loss see."""

    def on_train_batch_loss_end(self, context: PhaseContext) -> None:
        """After forward and loss: preds, loss (unscaled criterion value) and loss_log_items (detached: the
        loss itself, or the ``(K,)`` components of a loss that returns ``(loss, components)``) set."""

    def on_train_batch_backward_end(self, context: PhaseContext) -> None:
        """After loss.backward() (gradients accumulated, not yet applied)."""

    def on_train_batch_gradient_step_start(self, context: PhaseContext) -> None:
        """Only on stepping batches, before optimizer.step. Gradients are unscaled (AMP): clip or inspect here."""

    def on_train_batch_gradient_step_end(self, context: PhaseContext) -> None:
        """Only on stepping batches, after optimizer.step and zero_grad; global_step already counts this step."""

    def on_train_batch_end(self, context: PhaseContext) -> None:
        """After every train batch (also a batch where a stop was requested)."""

    def on_train_loader_end(self, context: PhaseContext) -> None:
        """After the epoch's training pass; metrics_dict holds the epoch's train metrics (loss averages first)."""

    def on_validation_loader_start(self, context: PhaseContext) -> None:
        """Before the validation pass of a validation epoch."""

    def on_validation_batch_start(self, context: PhaseContext) -> None:
        """Validation batch on the device: inputs, target, batch_idx set."""

    def on_validation_batch_end(self, context: PhaseContext) -> None:
        """After forward, loss and metric update of a validation batch: preds, loss set."""

    def on_validation_loader_end(self, context: PhaseContext) -> None:
        """metrics_dict holds this epoch's validation metrics."""

    def on_validation_end_best_epoch(self, context: PhaseContext) -> None:
        """Only when metric_to_watch strictly improved this epoch; best_metric holds the new best."""

    def on_test_loader_start(self, context: PhaseContext) -> None:
        """Before each test loader's pass; test_loader is set to it."""

    def on_test_batch_start(self, context: PhaseContext) -> None:
        """Test batch on the device: inputs, target, batch_idx set."""

    def on_test_batch_end(self, context: PhaseContext) -> None:
        """After forward, loss and metric update of a test batch."""

    def on_test_loader_end(self, context: PhaseContext) -> None:
        """metrics_dict holds this test loader's metrics."""

    def on_epoch_end(self, context: PhaseContext) -> None:
        """Once per completed epoch, after its validation, best-epoch and test events and before the epoch's
        checkpoints are written (state changed here is saved). Not fired for an epoch cut short by a stop
        during a batch. metrics_dict holds the last metrics computed (validation's on validation epochs)."""

    def on_checkpoint_saved(self, context: PhaseContext) -> None:
        """On the training thread, once a checkpoint's files are complete on disk: context.checkpoint_paths lists
        them (ckpt_latest, and ckpt_best, a ckpt_epoch_N or a save_top_k file written with it). Checkpoints are
        written in the background, so this comes after the train batch during which the write finished, or, for
        the last one, before on_training_end. Upload or copy the files here."""

    def on_training_end(self, context: PhaseContext) -> None:
        """Always exactly once, last; also after a stop, Ctrl-C, or an exception (context.exception set).
        Every callback's on_training_end runs even if an earlier one raises; the first exception then
        propagates."""


class Phase(str, enum.Enum):
    """The older phase names; each maps to one event (see PhaseCallback)."""

    PRE_TRAINING = "PRE_TRAINING"
    TRAIN_EPOCH_START = "TRAIN_EPOCH_START"
    TRAIN_BATCH_END = "TRAIN_BATCH_END"
    TRAIN_BATCH_STEP = "TRAIN_BATCH_STEP"
    TRAIN_EPOCH_END = "TRAIN_EPOCH_END"
    VALIDATION_BATCH_END = "VALIDATION_BATCH_END"
    VALIDATION_EPOCH_END = "VALIDATION_EPOCH_END"
    VALIDATION_END_BEST_EPOCH = "VALIDATION_END_BEST_EPOCH"
    TEST_BATCH_END = "TEST_BATCH_END"
    TEST_END = "TEST_END"
    POST_TRAINING = "POST_TRAINING"


#: The event each Phase runs on. TRAIN_BATCH_END is on_train_batch_loss_end, as in the reference
#: implementation (its overview diagram places it beside on_train_batch_backward_end).
PHASE_EVENTS: Dict[Phase, str] = {
    Phase.PRE_TRAINING: "on_training_start",
    Phase.TRAIN_EPOCH_START: "on_train_loader_start",
    Phase.TRAIN_BATCH_END: "on_train_batch_loss_end",
    Phase.TRAIN_BATCH_STEP: "on_train_batch_gradient_step_end",
    Phase.TRAIN_EPOCH_END: "on_train_loader_end",
    Phase.VALIDATION_BATCH_END: "on_validation_batch_end",
    Phase.VALIDATION_EPOCH_END: "on_validation_loader_end",
    Phase.VALIDATION_END_BEST_EPOCH: "on_validation_end_best_epoch",
    Phase.TEST_BATCH_END: "on_test_batch_end",
    Phase.TEST_END: "on_test_loader_end",
    Phase.POST_TRAINING: "on_training_end",
}


def parse_phase(value: Any, what: str = "phase") -> Phase:
    """A :class:`Phase` from a Phase, its name ("TRAIN_EPOCH_END", any case) or "Phase.TRAIN_EPOCH_END" (as a
    YAML recipe gives it); ValueError naming ``what`` and the valid phases otherwise."""
    if isinstance(value, Phase):
        return value
    name = str(value).strip()
    if name.lower().startswith("phase."):
        name = name[len("phase."):]
    try:
        return Phase(name.upper())
    except ValueError:
        raise ValueError(f"{what}: unknown phase {value!r}; valid phases: {', '.join(p.value for p in Phase)} "
                         "(a Phase, its name, or 'Phase.NAME')") from None


class PhaseCallback(Callback):
    """A callback that runs ``__call__(context)`` on exactly one event, chosen by ``phase``.

    ``phase`` is a :class:`Phase`, its name (``PhaseCallback("TRAIN_EPOCH_END")``) or "Phase.TRAIN_EPOCH_END".
    Subclasses override ``__call__``.
    """

    def __init__(self, phase: Union[Phase, str]) -> None:
        phase = parse_phase(phase, type(self).__name__)
        self.phase = phase
        # The instance attribute shadows the no-op event method, so the handler sees this event overridden.
        setattr(self, PHASE_EVENTS[phase], self.__call__)

    def __call__(self, context: PhaseContext) -> None:
        raise NotImplementedError(f"{type(self).__name__} must implement __call__(context)")

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.phase.value})"


def _receives(callback: object, event: str) -> bool:
    """True when ``callback`` overrides ``event`` (a no-op inherited from Callback does not count)."""
    method = getattr(callback, event, None)
    if method is None or not callable(method):
        return False
    return getattr(method, "__func__", method) is not getattr(Callback, event)


_class_events: "weakref.WeakKeyDictionary[type, FrozenSet[str]]" = weakref.WeakKeyDictionary()


def _received_events(callback: object) -> FrozenSet[str]:
    """The events ``callback`` receives (:func:`_receives`), worked out once per class: only an instance attribute
    named after an event (PhaseCallback sets one) needs a look per object."""
    cls = type(callback)
    if getattr(cls, "__getattr__", None) is not None:  # attributes made on the fly: ask each time
        return frozenset(e for e in EVENTS if _receives(callback, e))
    events = _class_events.get(cls)
    if events is None:
        events = _class_events[cls] = frozenset(e for e in EVENTS if _receives(cls, e))
    own = [name for name in getattr(callback, "__dict__", {}) if name in EVENTS]
    if own:
        events = (events - set(own)) | {e for e in own if _receives(callback, e)}
    return events


def _ignore(context: PhaseContext) -> None:
    """What an event with no receivers calls."""


def _fire(receivers: Tuple[Callable[[PhaseContext], None], ...]) -> Callable[[PhaseContext], None]:
    if not receivers:
        return _ignore
    if len(receivers) == 1:
        return receivers[0]

    def fire(context: PhaseContext) -> None:
        for receive in receivers:
            receive(context)

    return fire


def _fire_all(receivers: Tuple[Callable[[PhaseContext], None], ...]) -> Callable[[PhaseContext], None]:
    """on_training_end: every receiver runs even when one raises (so loggers still close); the first
    exception is re-raised afterwards."""

    def fire(context: PhaseContext) -> None:
        first: Optional[BaseException] = None
        for receive in receivers:
            try:
                receive(context)
            except BaseException as err:  # noqa: B902 - also Ctrl-C: the rest must still close their files
                first = first or err
        if first is not None:
            raise first

    return fire


class CallbackHandler(Callback):
    """Forwards each event to the callbacks that override it, lowest priority value first.

    The per-event dispatch tuples are computed once here, so firing an event nobody listens to is a loop
    over an empty tuple. Among equal priorities the given order is kept.
    """

    def __init__(self, callbacks: Iterable[Callback] = ()) -> None:
        self.callbacks: List[Callback] = []
        self._dispatch: Dict[str, Tuple[Callable[[PhaseContext], None], ...]] = {e: () for e in EVENTS}
        self.add(*callbacks)

    def add(self, *callbacks: Callback) -> None:
        """Add callbacks and recompute the dispatch table (call before training, not per batch)."""
        for callback in callbacks:
            if not isinstance(callback, Callback) and not any(_receives(callback, e) for e in EVENTS):
                raise TypeError(f"{callback!r} is not a Callback: callbacks subclass super_trainer.Callback")
            resolve_priority(getattr(callback, "priority", Priority.NORMAL), callback)
            warn_unknown_hooks(callback, EVENTS)
        self.callbacks.extend(callbacks)
        ordered = sorted(  # sorted() is stable, so equal priorities keep the given order
            self.callbacks, key=lambda cb: resolve_priority(getattr(cb, "priority", Priority.NORMAL), cb)
        )
        self.callbacks = ordered
        received = {id(cb): _received_events(cb) for cb in ordered}
        self._dispatch = {
            event: tuple(getattr(cb, event) for cb in ordered if event in received[id(cb)]) for event in EVENTS
        }
        for event, receivers in self._dispatch.items():
            # Instance attributes shadow the class-level forwarders with the cheapest callable that does the
            # same: nothing, the one receiver itself, or a loop over the receivers.
            setattr(self, event, _fire_all(receivers) if event == "on_training_end" else _fire(receivers))
        self.state_keys()  # fail now, not at the first checkpoint, on colliding state keys

    def receivers(self, event: str) -> Tuple[Callable[[PhaseContext], None], ...]:
        """The bound methods that receive ``event``, in call order."""
        return self._dispatch[event]

    def state_keys(self) -> Dict[str, Callback]:
        """Stateful callbacks by their ``state_key``; two with the same key raise ValueError."""
        keyed: Dict[str, Callback] = {}
        for callback in self.callbacks:
            if not callable(getattr(callback, "state_dict", None)):
                continue
            key = getattr(callback, "state_key", type(callback).__qualname__)
            if key in keyed:
                raise ValueError(
                    f"two stateful callbacks share the state_key {key!r} ({keyed[key]!r} and {callback!r}); "
                    "give one a distinct `state_key` so resume restores each its own state"
                )
            keyed[key] = callback
        return keyed

    def state_dict(self) -> Dict[str, Any]:
        """Each stateful callback's state, keyed by its state_key."""
        return {key: cb.state_dict() for key, cb in self.state_keys().items()}

    def load_state_dict(self, states: Dict[str, Any]) -> List[str]:
        """Restore callback states; returns the saved keys that no callback claimed."""
        keyed = self.state_keys()
        for key, state in states.items():
            if key in keyed:
                keyed[key].load_state_dict(state)
        return [key for key in states if key not in keyed]

    def describe(self) -> str:
        """A table: for each event, the callbacks that receive it, in call order, with priority."""
        width = max(len(e) for e in EVENTS)
        lines = [f"{'event'.ljust(width)}  callbacks (priority)"]
        for event in EVENTS:
            names = []
            for receive in self._dispatch[event]:
                owner = getattr(receive, "__self__", receive)
                prio = resolve_priority(getattr(owner, "priority", Priority.NORMAL), owner)
                names.append(f"{_display_name(owner)}({prio})")
            lines.append(f"{event.ljust(width)}  {', '.join(names) if names else '-'}")
        return "\n".join(lines)

    def __repr__(self) -> str:
        return f"CallbackHandler({[_display_name(cb) for cb in self.callbacks]})"


def _display_name(callback: object) -> str:
    if isinstance(callback, PhaseCallback):
        return repr(callback)
    return type(callback).__name__

