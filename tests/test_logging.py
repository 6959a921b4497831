"""TensorBoard event files and experiment.log, read back with tensorboard's own reader (SPEC §5 tags)."""
from __future__ import annotations

import math

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from conftest import make_loader, make_model, only_run, quiet_params
from super_trainer import Callback, Trainer


def test_tensorboard_tags_and_values(tmp_path):
    result = Trainer("tb", tmp_path).train(
        model=make_model(),
        training_params=quiet_params(max_epochs=3, sg_logger="tensorboard", log_interval=2,
                                     initial_lr={"0.": 0.05, "default": 0.1}),
        train_loader=make_loader(32, 8), valid_loader=make_loader(16, 8), test_loaders={"holdout": make_loader(8, 8)})
    events = EventAccumulator(str(only_run(tmp_path / "tb")))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    expected = {"Train/CrossEntropyLoss", "Valid/CrossEntropyLoss", "Valid/Accuracy", "LR/0.", "LR/default",
                "Test/holdout/CrossEntropyLoss", "Test/holdout/Accuracy", "Step/Train/loss", "Step/LR/default"}
    assert expected <= tags, tags
    valid_acc = events.Scalars("Valid/Accuracy")
    assert [e.step for e in valid_acc] == [0, 1, 2]
    for event, entry in zip(valid_acc, result.history):
        assert event.value == pytest.approx(entry["valid/Accuracy"], abs=1e-6)
    train_loss = events.Scalars("Train/CrossEntropyLoss")
    assert [e.value for e in train_loss] == pytest.approx([h["train/CrossEntropyLoss"] for h in result.history], abs=1e-6)
    assert [e.value for e in events.Scalars("LR/0.")] == pytest.approx([0.05] * 3)
    steps = [e.step for e in events.Scalars("Step/Train/loss")]
    assert steps == [2, 4, 6, 8, 10, 12]  # every log_interval=2 optimizer steps, 4 steps per epoch
    assert events.Scalars("Test/holdout/Accuracy")[0].value == pytest.approx(result.test_metrics["holdout"]["Accuracy"])


def test_base_logger_writes_experiment_log_only(tmp_path):
    Trainer("base", tmp_path).train(model=make_model(), training_params=quiet_params(max_epochs=2, sg_logger="base"),
                                    train_loader=make_loader(), valid_loader=make_loader(16))
    exp = only_run(tmp_path / "base")
    assert not list(exp.glob("events.out.tfevents*"))
    text = (exp / "experiment.log").read_text()
    assert "epoch 1  Valid/CrossEntropyLoss=" in text
    assert text.strip().splitlines()[-1].endswith("training ended: completed")


def test_callbacks_can_log_through_context_sg_logger(tmp_path):
    class Custom(Callback):
        def on_validation_loader_end(self, context):
            context.sg_logger.add_scalar("Custom/double_acc", 2 * context.metrics_dict["Accuracy"], context.epoch)

    Trainer("custom", tmp_path).train(
        model=make_model(), training_params=quiet_params(max_epochs=2, sg_logger="tensorboard", phase_callbacks=[Custom()]),
        train_loader=make_loader(), valid_loader=make_loader(16))
    events = EventAccumulator(str(only_run(tmp_path / "custom")))
    events.Reload()
    assert [e.step for e in events.Scalars("Custom/double_acc")] == [0, 1]


def test_progress_bar_shows_epochs(tmp_path, capsys):
    Trainer("bar", tmp_path).train(model=make_model(), training_params=quiet_params(max_epochs=2, progress_bar=True),
                                   train_loader=make_loader(), valid_loader=make_loader(16))
    err = capsys.readouterr().err
    assert "Train epoch 0" in err and "Train epoch 1" in err and "8/8" in err


@pytest.mark.parametrize("mininterval", [0.0, None])
def test_progress_bar_of_a_long_pass_updates_in_steps_and_ends_exact(tmp_path, monkeypatch, mininterval):
    """At most 50 updates, exact at the end; the loss is read only for a redraw, at most once per log_interval
    (mininterval 0: every update redraws; tqdm's default 0.1 s: a fast pass redraws rarely, and reads no loss
    for the updates it does not draw)."""
    import tqdm.std

    import super_trainer.callbacks.progress as progress

    updates, losses, closed, draws = [], [], [], []
    real_update, real_postfix, real_close = tqdm.std.tqdm.update, tqdm.std.tqdm.set_postfix, tqdm.std.tqdm.close
    real_display = tqdm.std.tqdm.display

    def update(bar, n=1):
        updates.append((bar.desc, n))
        return real_update(bar, n)

    def set_postfix(bar, ordered_dict=None, refresh=True, **kwargs):
        if "loss" in kwargs:
            losses.append((float(kwargs["loss"]), len(draws)))
        return real_postfix(bar, ordered_dict, refresh, **kwargs)

    def close(bar):
        closed.append((bar.desc, bar.n, bar.total))
        return real_close(bar)

    def display(bar, *args, **kwargs):
        if bar.desc.startswith("Train") and not bar.disable:
            draws.append(bar.n)
        return real_display(bar, *args, **kwargs)

    class Bar(progress._Bar):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs, **({} if mininterval is None else {"mininterval": mininterval}))

    monkeypatch.setattr(progress, "_Bar", Bar)
    monkeypatch.setattr(tqdm.std.tqdm, "update", update)
    monkeypatch.setattr(tqdm.std.tqdm, "set_postfix", set_postfix)
    monkeypatch.setattr(tqdm.std.tqdm, "close", close)
    monkeypatch.setattr(tqdm.std.tqdm, "display", display)
    Trainer("long_bar", tmp_path).train(model=make_model(), training_params=quiet_params(
        max_epochs=1, progress_bar=True, log_interval=10), train_loader=make_loader(n=8 * 130, batch_size=8),
        valid_loader=make_loader(16))
    train = [n for desc, n in updates if desc.startswith("Train")]
    assert sum(train) == 130 and len(train) == 44  # every 3 batches (at most 50 updates), and the last one at the end
    assert {(n, total) for desc, n, total in closed if desc.startswith("Train")} == {(130, 130)}  # tqdm may close twice
    assert all(math.isfinite(loss) for loss, _ in losses)
    if mininterval == 0.0:
        assert 13 <= len(losses) <= 14  # the loss once per log_interval (10) steps of 130
    # each loss read is drawn before the next read: the draw count grows between reads, and after the last one
    counts = [count for _, count in losses]
    assert all(a < b for a, b in zip(counts, counts[1:])) and (not counts or len(draws) > counts[-1])


def test_progress_bar_starts_no_thread_and_redraws_after_a_slow_batch(tmp_path, capsys):
    """tqdm's monitor thread (started per bar, joined at its close) is off: the bar redraws at its own updates."""
    import threading
    import time

    from tqdm._monitor import TMonitor

    seen = []

    class SlowWatch(Callback):
        def on_train_batch_end(self, context):
            seen.extend(type(t).__name__ for t in threading.enumerate() if isinstance(t, TMonitor))
            if context.batch_idx == 1:
                time.sleep(0.15)  # longer than tqdm's mininterval (0.1 s): the next update redraws

    Trainer("bar_thread", tmp_path).train(model=make_model(), training_params=quiet_params(
        max_epochs=1, progress_bar=True, phase_callbacks=[SlowWatch()]), train_loader=make_loader(n=32, batch_size=8),
        valid_loader=make_loader(16))
    assert seen == []
    err = capsys.readouterr().err
    assert "2/4" in err and "4/4" in err  # drawn at the update after the slow batch, and exact at the end


@pytest.mark.parametrize("on_terminal", [True, False])
def test_progress_bar_follows_the_width_only_on_a_terminal(tmp_path, monkeypatch, on_terminal):
    """A real pseudo-terminal as stderr: the bar asks tqdm to follow its width; a plain file: a fixed width."""
    import io
    import os
    import sys

    import super_trainer.callbacks.progress as progress

    opened = []

    class Recording(progress._Bar):
        def __init__(self, *args, **kwargs):
            opened.append(kwargs["dynamic_ncols"])
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(progress, "_Bar", Recording)
    if on_terminal:
        leader, follower = os.openpty()
        stream = os.fdopen(follower, "w")
    else:
        leader, stream = None, io.StringIO()
    monkeypatch.setattr(sys, "stderr", stream)
    try:
        Trainer("width", tmp_path).train(model=make_model(), training_params=quiet_params(
            max_epochs=1, progress_bar=True), train_loader=make_loader(), valid_loader=make_loader(16))
    finally:
        stream.close()
        if leader is not None:
            os.close(leader)
    assert opened == [on_terminal, on_terminal]  # the train and the validation bar


def test_silent_mode_prints_nothing(tmp_path, capsys):
    Trainer("silent", tmp_path).train(model=make_model(), training_params=quiet_params(max_epochs=1, progress_bar=True,
                                                                                        silent_mode=True),
                                      train_loader=make_loader(), valid_loader=make_loader(16))
    captured = capsys.readouterr()
    assert captured.err == "" and captured.out == ""


def test_csv_logger_rows_match_history(tmp_path):
    import csv

    from super_trainer import CSVLogger

    class StopMidEpoch2(Callback):
        def on_train_batch_end(self, context):
            if context.epoch == 2 and context.batch_idx == 1:
                context.stop_training = True

    result = Trainer("csv", tmp_path).train(
        model=make_model(), training_params=quiet_params(max_epochs=4, run_validation_freq=2,
                                                         phase_callbacks=[CSVLogger(), StopMidEpoch2()]),
        train_loader=make_loader(), valid_loader=make_loader(16))
    with open(only_run(tmp_path / "csv") / "results.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [int(r["epoch"]) for r in rows] == [0, 1]  # the stopped epoch 2 has no row
    assert list(rows[0])[:3] == ["epoch", "lr", "seconds"]
    assert rows[0]["valid/Accuracy"] == "" and float(rows[1]["valid/Accuracy"]) == pytest.approx(
        result.history[1]["valid/Accuracy"])
    assert float(rows[1]["train/CrossEntropyLoss"]) == pytest.approx(result.history[1]["train/CrossEntropyLoss"])


def test_tensorboard_has_one_point_per_step_after_ctrl_c_and_resume(tmp_path):
    class CtrlC(Callback):
        def on_train_batch_end(self, context):
            if context.epoch == 1 and context.batch_idx == 1:
                raise KeyboardInterrupt  # lands after a batch: the place is checkpointed

    def run(**extra):
        return Trainer("tb_resume", tmp_path).train(
            model=make_model(), training_params=quiet_params(max_epochs=3, sg_logger="tensorboard", log_interval=1,
                                                             **extra),
            train_loader=make_loader(32, 8), valid_loader=make_loader(16, 8))

    assert run(phase_callbacks=[CtrlC()]).stop_reason == "interrupted"
    result = run(resume=True)
    assert result.stop_reason == "completed"
    events = EventAccumulator(str(only_run(tmp_path / "tb_resume")))
    events.Reload()
    assert [e.step for e in events.Scalars("Step/Train/loss")] == list(range(1, 13))  # no step twice
    assert [e.step for e in events.Scalars("Train/CrossEntropyLoss")] == [0, 1, 2]  # the partial epoch 1 once
    assert [e.step for e in events.Scalars("Valid/Accuracy")] == [0, 1, 2]


def test_the_train_passs_points_are_on_disk_when_an_evaluation_starts(tmp_path):
    """Step-level points are queued during the pass and written before validation runs (it may take long)."""
    from super_trainer.callbacks.base import Priority

    seen = []

    class ReadAtValidationStart(Callback):
        priority = Priority.VERY_LOW  # after the logger's own on_validation_loader_start

        def on_validation_loader_start(self, context):
            events = EventAccumulator(str(context.ckpt_dir))
            events.Reload()
            seen.append([e.step for e in events.Scalars("Step/Train/loss")])

    Trainer("tb_before_valid", tmp_path).train(model=make_model(), training_params=quiet_params(
        max_epochs=2, sg_logger="tensorboard", log_interval=2, phase_callbacks=[ReadAtValidationStart()]),
        train_loader=make_loader(32, 8), valid_loader=make_loader(16, 8))
    assert seen == [[2, 4], [2, 4, 6, 8]]
