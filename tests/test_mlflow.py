"""sg_logger: mlflow, read back with MLflow's own client (SPEC §8 "MLflow")."""
from __future__ import annotations

import filecmp
import sys

from pathlib import Path

import pytest
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from conftest import make_loader, make_model, quiet_params
from super_trainer import Callback, Trainer

mlflow = pytest.importorskip("mlflow", reason="the [mlflow] extra is not installed")
from mlflow import MlflowClient  # noqa: E402


def _only_run(client: MlflowClient, experiment_name: str):
    experiment = client.get_experiment_by_name(experiment_name)
    assert experiment is not None, f"no MLflow experiment {experiment_name!r}"
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1, [r.info.run_name for r in runs]
    return runs[0]


def _points(client: MlflowClient, run_id: str, key: str):
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def _assert_history_logged(client: MlflowClient, run_id: str, history) -> None:
    columns = {c for row in history for c in row if c != "epoch"}
    assert {"train/CrossEntropyLoss", "valid/Accuracy", "valid/CrossEntropyLoss", "lr", "seconds"} <= columns
    for column in columns:
        expected = [(row["epoch"], row[column]) for row in history if column in row]
        logged = _points(client, run_id, column)
        assert [s for s, _ in logged] == [s for s, _ in expected], column
        assert [v for _, v in logged] == pytest.approx([v for _, v in expected], rel=1e-6), column


def test_mlflow_holds_history_params_step_points_and_best_checkpoint(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    result = Trainer("mlexp", tmp_path / "ck").train(
        model=make_model(), training_params=quiet_params(max_epochs=3, sg_logger="mlflow", log_interval=2,
                                                         optimizer_params={"momentum": 0.9}),
        train_loader=make_loader(32, 8), valid_loader=make_loader(16, 8), test_loaders={"holdout": make_loader(8, 8)})

    client = MlflowClient(f"sqlite:///{tmp_path / 'ck' / 'mlruns' / 'mlflow.db'}")  # the default local store
    run = _only_run(client, "mlexp")
    run_dir = Path(result.ckpt_dir)  # <ck>/mlexp/RUN_...: the MLflow run is named after the run dir
    assert run.info.run_name == run_dir.name and run.info.status == "FINISHED"
    _assert_history_logged(client, run.info.run_id, result.history)
    assert _points(client, run.info.run_id, "test/holdout/Accuracy") == [(2, pytest.approx(
        result.test_metrics["holdout"]["Accuracy"]))]

    # every resolved training_param is an MLflow param, nested mappings with dotted keys
    params = run.data.params
    resolved = yaml.safe_load((run_dir / "training_params.yaml").read_text())
    for key, value in resolved.items():
        assert key in params or any(p.startswith(f"{key}.") for p in params), key
    assert params["max_epochs"] == "3" and params["initial_lr"] == "0.1"
    assert params["optimizer_params.momentum"] == "0.9"

    # step-level points: the same steps and values as TensorBoard's Step/ tags, which are still written
    events = EventAccumulator(str(run_dir))
    events.Reload()
    tensorboard_loss = [(e.step, e.value) for e in events.Scalars("Step/Train/loss")]
    logged_loss = _points(client, run.info.run_id, "Step/Train/loss")
    assert [s for s, _ in logged_loss] == [2, 4, 6, 8, 10, 12] == [s for s, _ in tensorboard_loss]
    assert [v for _, v in logged_loss] == pytest.approx([v for _, v in tensorboard_loss], rel=1e-6)
    assert _points(client, run.info.run_id, "Step/LR/default") == [(s, pytest.approx(0.1)) for s in range(2, 13, 2)]
    assert "MLflow" in (run_dir / "experiment.log").read_text()

    # ckpt_best.pth, byte for byte
    assert [a.path for a in client.list_artifacts(run.info.run_id)] == ["ckpt_best.pth"]
    downloaded = client.download_artifacts(run.info.run_id, "ckpt_best.pth", str(tmp_path))
    assert filecmp.cmp(downloaded, result.best_ckpt_path, shallow=False)
    assert list(cwd.iterdir()) == []  # nothing in the working directory


def test_resume_continues_the_mlflow_run_and_a_new_run_starts_a_new_one(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    store = tmp_path / "store"
    logger_params = {"tracking_uri": str(store), "experiment_name": "shared", "flush_secs": 5}

    def train(max_epochs: int, resume: bool):
        params = quiet_params(max_epochs=max_epochs, sg_logger="mlflow", sg_logger_params=logger_params, resume=resume,
                              log_interval=2, phase_callbacks=[Callback()])  # its repr holds an address
        return Trainer("resumed", tmp_path / "ck").train(model=make_model(), training_params=params,
                                                          train_loader=make_loader(32, 8), valid_loader=make_loader(16))

    train(2, resume=False)
    with pytest.warns(UserWarning, match=r"keeps its first values of \['max_epochs'\]"):
        result = train(4, resume=True)
    client = MlflowClient(f"sqlite:///{store / 'mlflow.db'}")
    run = _only_run(client, "shared")  # the same run, continued
    assert run.info.run_name == Path(result.ckpt_dir).name and run.info.status == "FINISHED"
    assert run.data.params["max_epochs"] == "2"
    assert len(result.history) == 4
    _assert_history_logged(client, run.info.run_id, result.history)  # epochs 0-3, each once
    assert [s for s, _ in _points(client, run.info.run_id, "Step/Train/loss")] == list(range(2, 17, 2))
    assert run.info.artifact_uri.startswith((store / "artifacts").as_uri())

    train(1, resume=False)  # not a resume: a new MLflow run
    experiment = client.get_experiment_by_name("shared")
    assert len(client.search_runs([experiment.experiment_id])) == 2

    # a resume into a store without the checkpoint's run: a new run, given the checkpoint's earlier epochs too
    train(2, resume=False)
    logger_params["tracking_uri"] = str(tmp_path / "other_store")
    with pytest.warns(UserWarning, match=r"not an active run named 'RUN_\d+_\d+_\d+' in .*other_store.*; logging to a new run"):
        result = train(3, resume=True)
    other = MlflowClient(f"sqlite:///{tmp_path / 'other_store' / 'mlflow.db'}")
    run = _only_run(other, "shared")
    _assert_history_logged(other, run.info.run_id, result.history)  # epochs 0-2
    assert len(result.history) == 3


def test_a_failed_run_is_marked_failed_with_the_epochs_it_finished(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)

    class Boom(Callback):
        def on_train_loader_start(self, context):
            if context.epoch == 1:
                raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        Trainer("failing", tmp_path).train(
            model=make_model(),
            training_params=quiet_params(max_epochs=3, sg_logger="mlflow", phase_callbacks=[Boom()]),
            train_loader=make_loader(32, 8), valid_loader=make_loader(16))
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}")
    run = _only_run(client, "failing")
    assert run.info.status == "FAILED"
    assert [s for s, _ in _points(client, run.info.run_id, "valid/Accuracy")] == [0]


def test_without_mlflow_installed_the_error_names_the_extra_and_nothing_is_written(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "mlflow", None)  # makes `import mlflow` raise ImportError
    with pytest.raises(ImportError, match=r"pip install 'super-trainer\[mlflow\]'"):
        Trainer("nomlflow", tmp_path).train(model=make_model(), training_params=quiet_params(sg_logger="mlflow"),
                                            train_loader=make_loader(), valid_loader=make_loader(16))
    assert not (tmp_path / "nomlflow").exists()
