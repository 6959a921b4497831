"""TrainingResult's views (repr, HTML table, plot, DataFrame) and the end-of-epoch console line."""
from __future__ import annotations

import re
import struct
import sys
from pathlib import Path

import pytest

from conftest import make_loader, make_model, quiet_params
from super_trainer import Callback, Trainer, TrainingResult


@pytest.fixture(scope="module")
def result(tmp_path_factory) -> TrainingResult:
    root = tmp_path_factory.mktemp("result")
    params = quiet_params(max_epochs=3, lr_mode="cosine", silent_mode=True)
    return Trainer("views", root).train(model=make_model(), training_params=params, train_loader=make_loader(),
                                        valid_loader=make_loader(16))


def test_result_is_importable_from_both_places():
    from super_trainer.result import TrainingResult as from_module
    from super_trainer.trainer import TrainingResult as from_trainer

    assert from_module is TrainingResult is from_trainer


def test_repr_names_best_metric_stop_reason_and_dirs(result):
    text = repr(result)
    assert text.startswith("TrainingResult(stop_reason='completed', epochs run: 3)")
    assert f"best Accuracy: {result.best_metric:.4g} at epoch {result.best_epoch} (0-based)" in text
    assert f"ckpt_dir: {result.ckpt_dir}" in text and f"best_ckpt_path: {result.best_ckpt_path}" in text
    assert f"latest_ckpt_path: {result.latest_ckpt_path}" in text


def test_html_table_has_one_row_per_epoch_with_the_best_highlighted(result):
    html = result._repr_html_()
    head = html.split("<thead>")[1].split("</thead>")[0]
    assert re.findall(r"<th>([^<]*)</th>", head) == ["epoch", "train/CrossEntropyLoss", "valid/CrossEntropyLoss",
                                                      "valid/Accuracy", "lr", "seconds"]
    rows = html.split("<tbody>")[1].split("</tbody>")[0].strip().splitlines()
    assert len(rows) == len(result.history) == 3
    highlighted = [i for i, row in enumerate(rows) if row.startswith("<tr style=")]
    assert highlighted == [result.best_epoch]
    first_cells = re.findall(r"<td>([^<]*)</td>", rows[0])
    assert first_cells[0] == "0" and float(first_cells[3]) == pytest.approx(result.history[0]["valid/Accuracy"], rel=1e-3)


def test_html_escapes_names():
    result = TrainingResult(best_metric=None, best_epoch=None, metrics={}, history=[{"epoch": 0, "valid/<b>": 1.0}],
                            test_metrics={}, ckpt_dir="a&b", best_ckpt_path=None, latest_ckpt_path=None,
                            stop_reason="completed")
    html = result._repr_html_()
    assert "<th>valid/&lt;b&gt;</th>" in html and "a&amp;b" in html
    assert "best metric: none (no validation ran)" in repr(result)


def test_plot_saves_a_png_and_returns_the_figure(result, tmp_path):
    path = tmp_path / "curves.png"
    fig = result.plot(path)
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert struct.unpack(">II", data[16:24]) == (1200, 360)
    assert len(data) > 20_000  # three panels with curves and legends
    loss_ax, metric_ax, lr_ax = fig.axes
    assert [line.get_label() for line in loss_ax.get_lines()] == ["train/CrossEntropyLoss", "valid/CrossEntropyLoss"]
    assert "valid/Accuracy" in [line.get_label() for line in metric_ax.get_lines()]
    assert list(lr_ax.get_lines()[0].get_ydata()) == pytest.approx([h["lr"] for h in result.history])
    assert fig._repr_png_()[:8] == b"\x89PNG\r\n\x1a\n"  # what Jupyter shows, even without pyplot


def test_plot_without_matplotlib_names_the_extra(result, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib.backends.backend_agg", None)
    with pytest.raises(ImportError, match=r"pip install super-trainer\[plot\]"):
        result.plot()


def test_to_dataframe_matches_history(result, monkeypatch):
    frame = result.to_dataframe()
    assert list(frame.index) == [0, 1, 2]
    assert list(frame["valid/Accuracy"]) == pytest.approx([h["valid/Accuracy"] for h in result.history])
    monkeypatch.setitem(sys.modules, "pandas", None)
    with pytest.raises(ImportError, match=r"pip install super-trainer\[notebook\]"):
        result.to_dataframe()


LINE = re.compile(r"^Epoch (\d+)/3 \| train loss ([\d.]+) \| valid loss ([\d.]+) Accuracy ([\d.]+) "
                  r"\(best ([\d.]+) @(\d+)\) \| lr ([\d.e-]+) \| [\d.]+s$")


def test_epoch_line_per_epoch_with_validation_metrics(tmp_path, capsys):
    result = Trainer("lines", tmp_path).train(model=make_model(), training_params=quiet_params(max_epochs=3),
                                              train_loader=make_loader(), valid_loader=make_loader(16))
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 3
    for epoch, (line, entry) in enumerate(zip(lines, result.history)):
        match = LINE.match(line)
        assert match, line
        assert int(match.group(1)) == epoch + 1
        assert float(match.group(2)) == pytest.approx(entry["train/CrossEntropyLoss"], rel=1e-3)
        assert float(match.group(4)) == pytest.approx(entry["valid/Accuracy"], rel=1e-3)
        best_so_far = max(h["valid/Accuracy"] for h in result.history[: epoch + 1])
        assert float(match.group(5)) == pytest.approx(best_so_far, rel=1e-3)
        assert float(match.group(7)) == pytest.approx(entry["lr"], rel=1e-3)
    assert int(LINE.match(lines[-1]).group(6)) == result.best_epoch + 1


def test_ctrl_c_prints_one_line_and_no_epoch_line_for_the_partial_epoch(tmp_path, capsys):
    class CtrlC(Callback):
        def on_train_batch_end(self, context):
            if context.epoch == 1 and context.batch_idx == 2:
                raise KeyboardInterrupt

    result = Trainer("ctrl_c", tmp_path).train(model=make_model(), training_params=quiet_params(
        max_epochs=3, phase_callbacks=[CtrlC()]), train_loader=make_loader(), valid_loader=make_loader(16))
    captured = capsys.readouterr()
    lines = captured.out.strip().splitlines()
    assert result.stop_reason == "interrupted" and len(lines) == 2 and captured.err == ""
    assert LINE.match(lines[0]) and LINE.match(lines[0]).group(1) == "1"
    assert lines[1] == (f"Training interrupted in epoch 2/3 | resume from {Path(result.ckpt_dir) / 'ckpt_latest.pth'} "
                        f"| best Accuracy {result.best_metric:.4g} @1")


def test_epoch_line_names_loss_components_and_shows_the_largest_lr(tmp_path, capsys):
    import torch

    class TwoTerms(torch.nn.Module):
        component_names = ["cls", "reg"]

        def forward(self, preds, target):
            cls = torch.nn.functional.cross_entropy(preds, target)
            reg = preds.pow(2).mean()
            return cls + 0.01 * reg, torch.stack([cls.detach(), reg.detach()])

    Trainer("terms", tmp_path).train(model=make_model(), training_params=quiet_params(
        max_epochs=1, loss=TwoTerms(), metric_to_watch="TwoTerms/cls", greater_metric_to_watch_is_better=False,
        initial_lr={"0.": 0.0, "default": 0.05}), train_loader=make_loader(), valid_loader=make_loader(16))
    line = capsys.readouterr().out.strip()
    assert re.match(r"^Epoch 1/1 \| train TwoTerms/cls [\d.]+ \| valid TwoTerms/cls [\d.]+ \(best [\d.]+ @1\) "
                    r"TwoTerms/reg [\d.]+ Accuracy [\d.]+ \| lr 0.05 \| [\d.]+s$", line), line
