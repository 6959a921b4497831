"""EventFile (the TensorBoard logger's synchronous event file) reads back, with tensorboard's own reader, as the
same records torch's SummaryWriter writes for the same calls."""
from __future__ import annotations

import threading

import numpy as np
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.utils.tensorboard import SummaryWriter

from super_trainer.callbacks.event_file import EventFile


def _write(writer, image, values):
    for step in range(3):
        writer.add_scalar("Train/loss", 1.0 / (step + 1), step)
    writer.add_text("notes", "hello **world**", 1)
    writer.add_image("input", image, 2, dataformats="HWC")
    writer.add_histogram("weights", values, 2, bins="auto")
    writer.add_histogram("weights_tf", values, 2, bins="tensorflow")
    writer.flush()
    writer.close()


def _read(path):
    events = EventAccumulator(str(path), size_guidance={"images": 0, "histograms": 0, "tensors": 0})
    events.Reload()
    return events


def test_event_file_reads_back_as_summary_writers(tmp_path):
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, size=(6, 5, 3), dtype=np.uint8)
    values = rng.normal(size=500)
    (tmp_path / "ours").mkdir()
    threads_before = threading.active_count()
    ours = EventFile(tmp_path / "ours")
    assert threading.active_count() == threads_before  # no writer thread
    _write(ours, image, values)
    _write(SummaryWriter(str(tmp_path / "torch")), image, values)
    mine, theirs = _read(tmp_path / "ours"), _read(tmp_path / "torch")
    assert mine.Tags()["scalars"] == theirs.Tags()["scalars"] == ["Train/loss"]
    assert [(e.step, e.value) for e in mine.Scalars("Train/loss")] == \
        [(e.step, e.value) for e in theirs.Scalars("Train/loss")] == [(0, 1.0), (1, 0.5), (2, pytest.approx(1 / 3))]
    for tag in ("weights", "weights_tf"):
        a, b = mine.Histograms(tag)[0], theirs.Histograms(tag)[0]
        assert a.step == b.step == 2 and a.histogram_value == b.histogram_value
    assert len(mine.Histograms("weights_tf")[0].histogram_value.bucket_limit) > 50  # TensorFlow's fine buckets
    img_a, img_b = mine.Images("input")[0], theirs.Images("input")[0]
    assert (img_a.step, img_a.width, img_a.height, img_a.encoded_image_string) == \
        (img_b.step, img_b.width, img_b.height, img_b.encoded_image_string)
    assert mine.Tensors("notes/text_summary")[0].tensor_proto == theirs.Tensors("notes/text_summary")[0].tensor_proto


def test_purge_step_drops_points_of_an_earlier_file(tmp_path):
    first = EventFile(tmp_path)
    for step in range(1, 6):
        first.add_scalar("Step/loss", float(step), step)
    first.close()
    resumed = EventFile(tmp_path, purge_step=3)  # a run resumed from the checkpoint of step 2
    for step in range(3, 5):
        resumed.add_scalar("Step/loss", 10.0 * step, step)
    resumed.close()
    assert len(list(tmp_path.glob("events.out.tfevents.*"))) == 2
    points = [(e.step, e.value) for e in _read(tmp_path).Scalars("Step/loss")]
    assert points == [(1, 1.0), (2, 2.0), (3, 30.0), (4, 40.0)]


def test_scalars_of_one_step_in_one_event_read_back_as_separate_points(tmp_path):
    (tmp_path / "one").mkdir()
    (tmp_path / "each").mkdir()
    grouped, single = EventFile(tmp_path / "one"), EventFile(tmp_path / "each")
    points = [("Step/Train/loss", 2.5), ("Step/LR/default", 0.1), ("Step/Train/loss", 2.25)]  # a tag twice
    for step in (50, 100):
        grouped.add_scalars(points, step)
        for tag, value in points:
            single.add_scalar(tag, value, step)
    grouped.close()
    single.close()
    mine, theirs = _read(tmp_path / "one"), _read(tmp_path / "each")
    for tag in ("Step/Train/loss", "Step/LR/default"):
        assert [(e.step, e.value) for e in mine.Scalars(tag)] == [(e.step, e.value) for e in theirs.Scalars(tag)]
    assert [(e.step, e.value) for e in mine.Scalars("Step/Train/loss")] == [(50, 2.5), (50, 2.25), (100, 2.5),
                                                                             (100, 2.25)]
