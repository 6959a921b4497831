"""The Quickstart's training example runs offline on CPU and says where its results went."""
from __future__ import annotations

import subprocess

from conftest import PYTHON, ROOT, only_run, python_env
from super_trainer.checkpoint import read_checkpoint


def test_quickstart_example_trains_and_reports(tmp_path):
    proc = subprocess.run([PYTHON, str(ROOT / "examples" / "quickstart.py"), "--epochs", "3", "--ckpt-root-dir", str(tmp_path)],
                          env=python_env(), capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    exp = only_run(tmp_path / "quickstart")
    assert f"checkpoints: {exp / 'ckpt_best.pth'}" in proc.stdout
    assert f"tensorboard --logdir {exp}" in proc.stdout
    latest = read_checkpoint(exp / "ckpt_latest.pth")
    assert latest["epoch"] == 3
    assert latest["best_metric"] > 0.5  # it learned something: 10 classes, chance is 0.1
