"""The example notebook runs top to bottom in a real Jupyter kernel."""
from __future__ import annotations

import shutil

import nbformat
from nbclient import NotebookClient

from conftest import ROOT


def test_quickstart_notebook_executes(tmp_path):
    notebook = tmp_path / "quickstart.ipynb"
    shutil.copy(ROOT / "examples" / "quickstart.ipynb", notebook)
    nb = nbformat.read(notebook, as_version=4)
    NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    text = "\n".join(out.get("text", "") for cell in nb.cells if cell.cell_type == "code" for out in cell.outputs)
    assert "epoch 2: valid loss" in text
    assert "stop reason: completed" in text
    assert text.count("\n0 ") >= 1 and "epoch,lr,seconds" in text
    assert "epochs: [0, 1, 2]" in text
    assert (tmp_path / "checkpoints" / "notebook" / "ckpt_best.pth").is_file()
    assert (tmp_path / "checkpoints" / "notebook_recipe" / "recipe.yaml").is_file()
