"""The event order of SPEC §1, PhaseCallback, context writes, priorities and dispatch."""
from __future__ import annotations

from typing import List

import pytest
import torch
from torchmetrics import Metric

from conftest import Recorder, make_loader, make_model, quiet_params
from super_trainer import Callback, CallbackHandler, Phase, PhaseCallback, PhaseContext, Priority, Trainer
from super_trainer.callbacks.base import EVENTS, PHASE_EVENTS


class ConstantMetric(Metric):
    """Always 0.5: only the first validation can be a strict improvement."""

    full_state_update = False

    def __init__(self) -> None:
        super().__init__()
        self.add_state("seen", default=torch.tensor(0.0), dist_reduce_fx="sum")

    def update(self, preds: torch.Tensor, target: torch.Tensor) -> None:
        self.seen += 1

    def compute(self) -> torch.Tensor:
        return torch.tensor(0.5)


def expected_trace(epochs: int, n_train: int, n_valid: int, n_test: int, accumulate: int = 1,
                   valid_epochs: List[int] = None, best_epochs: List[int] = None) -> List[str]:
    """The SPEC §1 diagram, written out independently of the trainer."""
    valid_epochs = list(range(epochs)) if valid_epochs is None else valid_epochs
    best_epochs = [valid_epochs[0]] if best_epochs is None else best_epochs
    trace = ["on_optimizer_built", "on_training_start"]
    for epoch in range(epochs):
        trace.append("on_train_loader_start")
        for b in range(n_train):
            trace += ["on_train_batch_start", "on_train_batch_loss_end", "on_train_batch_backward_end"]
            if (b + 1) % accumulate == 0 or b + 1 == n_train:
                trace += ["on_train_batch_gradient_step_start", "on_train_batch_gradient_step_end"]
            trace.append("on_train_batch_end")
        trace.append("on_train_loader_end")
        if epoch in valid_epochs:
            trace.append("on_validation_loader_start")
            trace += ["on_validation_batch_start", "on_validation_batch_end"] * n_valid
            trace.append("on_validation_loader_end")
            if epoch in best_epochs:
                trace.append("on_validation_end_best_epoch")
        if n_test and epoch == epochs - 1:
            trace.append("on_test_loader_start")
            trace += ["on_test_batch_start", "on_test_batch_end"] * n_test
            trace.append("on_test_loader_end")
        trace.append("on_epoch_end")
    trace.append("on_training_end")
    return trace


def run_recorded(tmp_path, **overrides) -> Recorder:
    recorder = Recorder()
    params = quiet_params(valid_metrics_list=[{"Const": ConstantMetric()}], metric_to_watch="Const",
                          phase_callbacks=[recorder], **overrides)
    Trainer("trace", tmp_path).train(
        model=make_model(), training_params=params, train_loader=make_loader(24, 8),
        valid_loader=make_loader(16, 8), test_loaders={"test": make_loader(8, 8)},
    )
    return recorder


def test_trace_two_epochs_with_validation_and_test(tmp_path):
    recorder = run_recorded(tmp_path, max_epochs=2)
    assert recorder.events == expected_trace(epochs=2, n_train=3, n_valid=2, n_test=1)
    # one on_checkpoint_saved per epoch-end write, after that epoch's on_epoch_end, all before on_training_end
    epoch_ends = [i for i, e in enumerate(recorder.events) if e == "on_epoch_end"]
    assert [at > end for (at, _, _), end in zip(recorder.saved, epoch_ends)] == [True, True]
    assert len(recorder.saved) == 2 and recorder.saved[-1][0] == len(recorder.events) - 1


def test_trace_batch_accumulate_steps_only_on_window_ends(tmp_path):
    recorder = run_recorded(tmp_path, max_epochs=2, batch_accumulate=2)
    assert recorder.events == expected_trace(epochs=2, n_train=3, n_valid=2, n_test=1, accumulate=2)
    steps = [d for d in recorder.detail if d[0] == "on_train_batch_gradient_step_end"]
    # batches 1 and 2 of each epoch step (window 2, then the epoch's last batch); global_step counts them
    assert [(e, b, g) for _, e, b, g in steps] == [(0, 1, 1), (0, 2, 2), (1, 1, 3), (1, 2, 4)]


def test_trace_run_validation_freq_two(tmp_path):
    recorder = run_recorded(tmp_path, max_epochs=3, run_validation_freq=2)
    assert recorder.events == expected_trace(epochs=3, n_train=3, n_valid=2, n_test=1, valid_epochs=[1, 2])


def test_trace_periodic_test_runs_once_on_last_epoch(tmp_path):
    recorder = run_recorded(tmp_path, max_epochs=2, run_test_freq=1)
    tests = [d[1] for d in recorder.detail if d[0] == "on_test_loader_start"]
    assert tests == [0, 1]  # after each epoch's validation, and only once after the last


def test_every_phase_fires_on_its_event_with_the_right_count(tmp_path):
    class Counter(PhaseCallback):
        def __init__(self, phase):
            super().__init__(phase)
            self.calls = 0

        def __call__(self, context):
            self.calls += 1

    by_enum = {phase: Counter(phase) for phase in Phase}
    by_name = {phase: Counter(phase.value) for phase in Phase}
    recorder = Recorder()
    params = quiet_params(valid_metrics_list=[{"Const": ConstantMetric()}], metric_to_watch="Const", max_epochs=2,
                          phase_callbacks=[recorder, *by_enum.values(), *by_name.values()])
    Trainer("phases", tmp_path).train(model=make_model(), training_params=params, train_loader=make_loader(24, 8),
                                      valid_loader=make_loader(16, 8), test_loaders={"t": make_loader(8, 8)})
    for phase in Phase:
        want = recorder.events.count(PHASE_EVENTS[phase])
        assert want > 0
        assert by_enum[phase].calls == want, phase
        assert by_name[phase].calls == want, phase
    handler = CallbackHandler(list(by_enum.values()))
    for event in EVENTS:
        receivers = [r.__self__.phase for r in handler.receivers(event)]
        assert receivers == [p for p in Phase if PHASE_EVENTS[p] == event]


def test_phase_values_and_bad_phase_name():
    assert Phase.TRAIN_EPOCH_END.value == "TRAIN_EPOCH_END"
    assert PHASE_EVENTS[Phase.TRAIN_BATCH_END] == "on_train_batch_loss_end"
    with pytest.raises(ValueError, match="TRAIN_EPOCH_END"):
        PhaseCallback("TRAIN_EPOCH_ENDS")


def test_replacing_inputs_changes_what_the_model_sees(tmp_path):
    seen = []

    class Zero(Callback):
        def on_train_batch_start(self, context):
            context.inputs = torch.zeros_like(context.inputs)

    class Spy(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = make_model()

        def forward(self, x):
            if self.training:
                seen.append(x.abs().sum().item())
            return self.inner(x)

    Trainer("inputs", tmp_path).train(model=Spy(), training_params=quiet_params(max_epochs=1, phase_callbacks=[Zero()]),
                                      train_loader=make_loader(24, 8), valid_loader=make_loader(8, 8))
    assert seen == [0.0, 0.0, 0.0]


def test_stop_at_batch_three_ends_the_epoch_there(tmp_path):
    class StopAt(Callback):
        def on_train_batch_end(self, context):
            if context.batch_idx == 3:
                context.stop_training = True

    recorder = Recorder()
    result = Trainer("stop", tmp_path).train(
        model=make_model(), training_params=quiet_params(max_epochs=3, phase_callbacks=[StopAt(), recorder]),
        train_loader=make_loader(64, 8), valid_loader=make_loader(16, 8))
    starts = [d[2] for d in recorder.detail if d[0] == "on_train_batch_start"]
    assert starts == [0, 1, 2, 3]
    assert "on_validation_loader_start" not in recorder.events
    assert recorder.events[-2:] == ["on_train_loader_end", "on_training_end"]
    assert result.stop_reason == "stopped_by_callback"
    assert result.history == []


def test_on_training_end_fires_once_after_an_exception(tmp_path):
    class Boom(Callback):
        def on_train_batch_loss_end(self, context):
            if context.batch_idx == 1:
                raise RuntimeError("boom")

    class SeesException(Callback):
        def __init__(self):
            self.ends = []

        def on_training_end(self, context):
            self.ends.append(context.exception)

    seer = SeesException()
    recorder = Recorder()
    with pytest.raises(RuntimeError, match="boom"):
        Trainer("boom", tmp_path).train(model=make_model(), training_params=quiet_params(phase_callbacks=[Boom(), seer, recorder]),
                                        train_loader=make_loader(24, 8), valid_loader=make_loader(8, 8))
    assert recorder.events.count("on_training_end") == 1
    assert recorder.events[-1] == "on_training_end"
    assert len(seer.ends) == 1 and isinstance(seer.ends[0], RuntimeError)


def test_priority_order_is_by_value_and_stable():
    calls = []

    def make(name, priority=None):
        class C(Callback):
            def on_train_batch_start(self, context):
                calls.append(name)

        callback = C()
        if priority is not None:
            callback.priority = priority
        return callback

    handler = CallbackHandler([
        make("normal-1"), make("low", "LOW"), make("very-high", Priority.VERY_HIGH), make("normal-2"),
        make("int-45", 45), make("high", "high"), make("normal-3", 50),
    ])
    handler.on_train_batch_start(PhaseContext())
    assert calls == ["very-high", "high", "int-45", "normal-1", "normal-2", "normal-3", "low"]
    with pytest.raises(ValueError, match="VERY_HIGH"):
        CallbackHandler([make("bad", "URGENT")])


def test_receivers_follow_each_objects_own_event_attributes():
    """The events a class overrides are worked out once per class; an event attribute of one object (PhaseCallback
    sets one; here a plain function, and None to silence an inherited method) counts for that object only."""
    calls = []

    class Ends(Callback):
        def on_training_end(self, context):
            calls.append("class")

    plain, silenced, extra = Ends(), Ends(), Ends()
    silenced.on_training_end = None
    extra.on_epoch_end = lambda context: calls.append("own")
    handler = CallbackHandler([plain, silenced, extra])
    assert len(handler.receivers("on_training_end")) == 2 and len(handler.receivers("on_epoch_end")) == 1
    handler.on_epoch_end(PhaseContext())
    handler.on_training_end(PhaseContext())
    assert calls == ["own", "class", "class"]
    assert len(CallbackHandler([Ends()]).receivers("on_epoch_end")) == 0  # the object's attribute stayed its own


def test_describe_lists_receivers_with_priority():
    class Warm(Callback):
        priority = Priority.VERY_HIGH

        def on_train_loader_start(self, context):
            pass

    class Idle(Callback):
        pass

    class Ender(PhaseCallback):
        def __call__(self, context):
            pass

    table = CallbackHandler([Idle(), Warm(), Ender(Phase.POST_TRAINING)]).describe()
    lines = {line.split()[0]: line for line in table.splitlines()[1:]}
    assert set(lines) == set(EVENTS)
    assert "Warm(10)" in lines["on_train_loader_start"]
    assert "Ender(POST_TRAINING)(50)" in lines["on_training_end"]
    assert "Idle" not in table
    assert lines["on_train_batch_start"].split()[-1] == "-"


def test_idle_callback_is_never_called(tmp_path, monkeypatch):
    called = []
    for event in EVENTS:
        def noop(self, context, _event=event):
            called.append((type(self).__name__, _event))
        monkeypatch.setattr(Callback, event, noop)  # the base no-ops now record any call that reaches them

    class Idle(Callback):
        pass

    idle = Idle()
    Trainer("idle", tmp_path).train(model=make_model(), training_params=quiet_params(phase_callbacks=[idle]),
                                    train_loader=make_loader(24, 8), valid_loader=make_loader(8, 8))
    assert called == []


def test_duplicate_state_keys_are_rejected():
    class Stateful(Callback):
        def state_dict(self):
            return {}

        def load_state_dict(self, state):
            pass

    with pytest.raises(ValueError, match="state_key"):
        CallbackHandler([Stateful(), Stateful()])


def test_context_fields_at_training_start(tmp_path):
    snapshot = {}

    class Look(Callback):
        def on_training_start(self, context):
            for name in ("optimizer", "net", "ckpt_dir", "criterion", "sg_logger", "train_loader", "valid_loader",
                         "training_params", "metric_to_watch", "device"):
                snapshot[name] = getattr(context, name)

    Trainer("ctx", tmp_path).train(model=make_model(), training_params=quiet_params(max_epochs=1, phase_callbacks=[Look()]),
                                   train_loader=make_loader(16, 8), valid_loader=make_loader(8, 8))
    assert all(v is not None for v in snapshot.values()), snapshot
    assert snapshot["ckpt_dir"].parent == tmp_path / "ctx" and snapshot["ckpt_dir"].name.startswith("RUN_")
    assert snapshot["metric_to_watch"] == "Accuracy"
    context = PhaseContext()
    assert context.stop_training is False and context.epoch is None
    context.update_context(anything=1, epoch=3)
    assert (context.anything, context.epoch) == (1, 3)


def test_trainer_test_fires_only_test_events_and_computes_metrics(tmp_path):
    model = make_model()
    loader = make_loader(24, 8)
    recorder = Recorder()
    metrics = Trainer("t", tmp_path).test(model=model, test_loader=loader, test_metrics_list=["Accuracy"],
                                          loss="CrossEntropyLoss", callbacks=[recorder])
    assert recorder.events == ["on_test_loader_start"] + ["on_test_batch_start", "on_test_batch_end"] * 3 + [
        "on_test_loader_end"]
    with torch.no_grad():
        preds = torch.cat([model(x) for x, _ in loader])
        target = torch.cat([y for _, y in loader])
        losses = [torch.nn.functional.cross_entropy(model(x), y).item() for x, y in loader]
    assert list(metrics) == ["CrossEntropyLoss", "Accuracy"]
    assert metrics["Accuracy"] == pytest.approx((preds.argmax(1) == target).float().mean().item())
    assert metrics["CrossEntropyLoss"] == pytest.approx(sum(losses) / len(losses))
    bf16 = Trainer("t", tmp_path).test(model=model, test_loader=loader, mixed_precision=True)
    assert list(bf16) == ["Accuracy"] and 0.0 <= bf16["Accuracy"] <= 1.0
