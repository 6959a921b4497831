"""Notebooks: the docs' quickstart runs top to bottom in a real Jupyter kernel (nbclient), and Ctrl-C in a cell
ends with one line, not a traceback."""
from __future__ import annotations

import base64
import re
import shutil
import struct
from pathlib import Path
from typing import List

import nbformat
from nbclient import NotebookClient
from nbformat.v4 import new_code_cell, new_notebook

from conftest import ROOT, only_run

WIDGET_MIME = "application/vnd.jupyter.widget-view+json"


def execute(nb: nbformat.NotebookNode, cwd: Path) -> nbformat.NotebookNode:
    NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(cwd)}}).execute()
    return nb


def outputs(cell: nbformat.NotebookNode) -> List[dict]:
    return list(cell.get("outputs", []))


def stream(cell: nbformat.NotebookNode, name: str = None) -> str:
    return "".join(o.get("text", "") for o in outputs(cell)
                   if o["output_type"] == "stream" and (name is None or o["name"] == name))


def png_size(data: bytes) -> tuple:
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", data[16:24])  # IHDR width, height


def test_quickstart_notebook_executes(tmp_path):
    notebook = tmp_path / "quickstart.ipynb"
    shutil.copy(ROOT / "docs" / "notebooks" / "quickstart.ipynb", notebook)
    nb = execute(nbformat.read(notebook, as_version=4), tmp_path)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert not [o for c in code for o in outputs(c) if o["output_type"] == "error"]
    stderr = "".join(stream(c, "stderr") for c in code)
    # the only warning: the resume cells say which training_params changed since the checkpoint's run (SPEC §8)
    unexpected = [line for line in stderr.splitlines() if "Warning" in line and "training_params differ" not in line]
    assert "Traceback" not in stderr and not unexpected and "IProgress" not in stderr, stderr
    text = "".join(stream(c) for c in code)

    # ipywidgets is installed (dev extras): tqdm.auto drew widget bars, not text bars
    assert any(WIDGET_MIME in o.get("data", {}) for c in code for o in outputs(c))
    assert "Train epoch 0" not in stderr
    # one end-of-epoch line per epoch, validation metrics included
    assert re.search(r"Epoch 3/3 \| train loss [\d.]+ \| valid loss [\d.]+ Accuracy [\d.]+ \(best [\d.]+ @\d\) "
                     r"Top5 [\d.]+ \| lr [\d.e-]+ \| [\d.]+s", text), text
    assert "1257 train images, 20 batches per epoch" in text and "optimizer steps: 60" in text

    # the result's HTML table: one row per epoch, exactly the best one highlighted
    html = next(o["data"]["text/html"] for c in code for o in outputs(c) if "text/html" in o.get("data", {}))
    body = html.split("<tbody>")[1].split("</tbody>")[0]
    assert body.count("<tr") == 3 and body.count("<tr style=") == 1
    best = float(re.search(r"best Accuracy <b>([\d.]+)</b>", html).group(1))
    assert best > 0.93  # EMA with a decay suited to 60 steps (0.96) is not broken (the default 0.9999 gives 0.86)

    # the plot: shown inline once, and saved as a 1200x360 PNG
    images = [base64.b64decode(o["data"]["image/png"]) for c in code for o in outputs(c) if "image/png" in o.get("data", {})]
    assert len(images) == 1 and png_size(images[0]) == (1200, 360)
    assert png_size((tmp_path / "curves.png").read_bytes()) == (1200, 360)
    assert (tmp_path / "curves.png").stat().st_size > 20_000  # three panels with curves, not an empty canvas

    assert "epoch,lr,seconds" in text
    assert "epochs: [0, 1, 2, 3, 4] | stop reason: completed" in text  # the same Trainer trained again, resumed
    assert "recipe epochs: [0, 1, 2]" in text  # a recipe trained twice from the class (Hydra state not leaked)
    assert (only_run(tmp_path / "checkpoints" / "notebook") / "ckpt_best.pth").is_file()  # resumed: one run dir
    assert (only_run(tmp_path / "checkpoints" / "notebook_recipe") / "recipe.yaml").is_file()


SETUP = """
import sys
sys.modules["ipywidgets"] = None  # as in a kernel without ipywidgets
import torch
from torch.utils.data import DataLoader, TensorDataset
from super_trainer import Callback, Trainer

torch.manual_seed(0)
x = torch.randn(64, 8)
data = DataLoader(TensorDataset(x, (x[:, 0] > 0).long()), batch_size=8)
model = torch.nn.Linear(8, 2)
params = {"max_epochs": 2, "initial_lr": 0.1, "sg_logger": "base", "progress_bar": False}
"""

TEXT_BARS = """
bars = Trainer("bars", "ckpts").train(model=model, training_params={**params, "max_epochs": 1, "progress_bar": True},
                                      train_loader=data, valid_loader=data)
"""

CTRL_C = """
class CtrlC(Callback):
    def on_train_batch_end(self, context):
        if context.batch_idx == 2:
            raise KeyboardInterrupt

result = Trainer("ctrl_c", "ckpts").train(model=model, training_params={**params, "phase_callbacks": [CtrlC()]},
                                          train_loader=data, valid_loader=data)
"""

# a real SIGINT, as Jupyter's "interrupt kernel" sends, while a long run is training
SIGINT = """
import os, signal, threading, time

class Slow(Callback):
    def on_train_batch_end(self, context):
        time.sleep(0.02)

threading.Timer(1.0, os.kill, (os.getpid(), signal.SIGINT)).start()
long_run = Trainer("sigint", "ckpts").train(model=model, training_params={**params, "max_epochs": 10_000,
                                            "phase_callbacks": [Slow()]}, train_loader=data, valid_loader=data)
print(long_run.stop_reason)
"""


def test_ctrl_c_in_a_notebook_cell_prints_one_line(tmp_path):
    nb = new_notebook(cells=[new_code_cell(SETUP), new_code_cell(TEXT_BARS), new_code_cell(CTRL_C),
                             new_code_cell("print(result.stop_reason, result.latest_ckpt_path is not None)"),
                             new_code_cell(SIGINT)])
    setup, bars, ctrl_c, after, sigint = execute(nb, tmp_path).cells

    # without ipywidgets: text bars, and no warning about it
    assert "Train epoch 0" in stream(bars, "stderr") and "IProgress" not in stream(bars)
    assert not any(WIDGET_MIME in o.get("data", {}) for o in outputs(bars))
    assert "Warning" not in stream(setup) + stream(bars)

    assert not [o for o in outputs(ctrl_c) if o["output_type"] == "error"]
    lines = [line for line in stream(ctrl_c).splitlines() if line.strip()]
    assert len(lines) == 1 and "interrupted" in lines[0], lines
    assert "Traceback" not in stream(ctrl_c)
    assert stream(after).strip() == "interrupted True"

    assert not [o for o in outputs(sigint) if o["output_type"] == "error"] and "Traceback" not in stream(sigint)
    lines = stream(sigint).strip().splitlines()
    assert lines[-1] == "interrupted" and lines[-2].startswith("Training interrupted in epoch "), lines
    assert all(line.startswith("Epoch ") for line in lines[:-2]), lines  # only the completed epochs' lines


def test_training_a_recipe_twice_in_one_process_leaves_no_hydra_state(tmp_path, monkeypatch):
    from hydra.core.global_hydra import GlobalHydra

    from super_trainer import Trainer
    from super_trainer.recipes import load_recipe

    monkeypatch.chdir(tmp_path)
    overrides = ["training_hyperparams.max_epochs=1", "training_hyperparams.progress_bar=false",
                 "training_hyperparams.silent_mode=true", f"ckpt_root_dir={tmp_path}"]
    first = Trainer.train(load_recipe("default", overrides + ["experiment_name=one"]))
    assert not GlobalHydra.instance().is_initialized()
    second = Trainer.train(load_recipe("default", overrides + ["experiment_name=two"]))
    assert not GlobalHydra.instance().is_initialized()
    assert [len(first.history), len(second.history)] == [1, 1]
    assert first.ckpt_dir != second.ckpt_dir
    assert first.history[0]["valid/Accuracy"] == second.history[0]["valid/Accuracy"]  # seeded: the same run again
