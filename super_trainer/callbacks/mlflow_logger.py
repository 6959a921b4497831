"""``sg_logger: mlflow`` (the ``[mlflow]`` extra): the run's params, per-epoch history, step-level loss and lr, and
``ckpt_best.pth``, logged to an MLflow run named after the run dir. TensorBoard and experiment.log are written too,
by the TensorBoardLogger that the trainer builds beside this callback (which stays ``context.sg_logger``).

MLflow is imported only when an ``MLflowLogger`` is built, so the package works without it.
"""
from __future__ import annotations

import logging
import os
import re
import time
import warnings
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple
from urllib.parse import urlparse

import torch

from ..distributed import is_main_process
from .base import Callback, PhaseContext, Priority
from .logging import param_group_names

__all__ = ["MLflowLogger", "default_store_dir"]

logger = logging.getLogger("super_trainer")

STORE_DIR = "mlruns"  # the local store inside ckpt_root_dir: mlflow.db and artifacts/
_BATCH = 1000  # MLflow's log_batch takes at most 1000 metrics and 100 params per call
_INVALID_KEY_CHARS = re.compile(r"[^\w/.\- :]")  # MLflow's allowed key characters, negated
_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")  # in default object reprs


def default_store_dir(ckpt_root_dir: Any) -> Path:
    """``<ckpt_root_dir>/mlruns``: where runs go when neither ``tracking_uri`` nor ``MLFLOW_TRACKING_URI`` is set."""
    return Path(ckpt_root_dir) / STORE_DIR


class MLflowLogger(Callback):
    """Logs one training run to MLflow (rank 0 only), through ``MlflowClient`` (MLflow's global active run
    is left alone):

    - on_training_start: the resolved training_params as params (nested keys joined with "."), in experiment
      ``experiment_name`` (default: the trainer's experiment name), as a run named after the run dir;
    - every ``log_interval`` optimizer steps: ``Step/Train/loss`` and ``Step/LR/<group>`` at the global step;
    - on_epoch_end: every numeric column of the epoch's history row (``train/<name>``, ``valid/<name>``, ``lr``,
      ``seconds``) under its history name, step = the 0-based epoch; ``test/<loader>/<name>`` after a test;
    - on_training_end: ``ckpt_best.pth`` as an artifact (``log_checkpoint``), and the run's status.

    ``tracking_uri``: a URI with a scheme (``sqlite:///...``, ``http://...``, ``file:...``) is MLflow's; a plain
    path is a local store directory (``mlflow.db`` plus ``artifacts/``). Default: ``MLFLOW_TRACKING_URI`` when
    set, else the local store ``<ckpt_root_dir>/mlruns``. The MLflow run id is part of the callback state in
    checkpoints, so a resume continues the same MLflow run.
    """

    priority = Priority.LOW  # after NORMAL callbacks, like the other loggers
    FLUSH_SECS = 30.0  # step-level points are sent in batches, at epoch ends and at least this often

    def __init__(self, tracking_uri: Optional[str] = None, experiment_name: Optional[str] = None,
                 log_checkpoint: bool = True) -> None:
        _import_mlflow()  # fail when the trainer is built, before anything is written
        self.tracking_uri = tracking_uri
        self.experiment_name = experiment_name
        self.log_checkpoint = log_checkpoint
        self.run_id: Optional[str] = None  # the checkpointed state: a resume continues this run
        self._client: Any = None  # set on rank 0 while training
        self._points: List[Any] = []
        self._last_flush = 0.0
        self._log_interval = 50

    def state_dict(self) -> Dict[str, Any]:
        return {"run_id": self.run_id} if self.run_id else {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.run_id = state.get("run_id")

    # ---- events --------------------------------------------------------------------------------------
    def on_training_start(self, context: PhaseContext) -> None:
        if not is_main_process():
            return
        params = context.training_params or {}
        self._log_interval = int(params.get("log_interval", 50))
        self._client, experiment_id, uri = _open_experiment(self.tracking_uri, self._experiment(context), context)
        run_name = Path(context.ckpt_dir).name
        continued = self._continued_run(run_name, uri)
        if continued is None:
            run = self._client.create_run(experiment_id, run_name=run_name, tags={
                "super_trainer.run_dir": str(Path(context.ckpt_dir).resolve())})
            self.run_id = run.info.run_id
            self._log_params(_flat_params(params), {})
            self._epoch_points(context.history or [])  # a run started from a checkpoint: its earlier epochs
        else:
            self._client.update_run(self.run_id, status="RUNNING")
            self._log_params(_flat_params(params), continued.data.params)
        self._flush()
        where = (f"{'continuing' if continued is not None else 'logging to'} run {run_name!r} ({self.run_id}) of "
                 f"experiment {self._experiment(context)!r} at {uri}")
        logger.info("MLflow: %s", where)
        if callable(getattr(context.sg_logger, "add_text", None)):  # experiment.log says where the run went
            context.sg_logger.add_text("MLflow", where)

    def on_train_batch_gradient_step_end(self, context: PhaseContext) -> None:
        if self._client is None or context.global_step % self._log_interval:
            return
        now, step = _now_ms(), context.global_step
        self._add("Step/Train/loss", context.loss, step, now)
        for name, group in zip(param_group_names(context.optimizer), context.optimizer.param_groups):
            self._add(f"Step/LR/{name}", group["lr"], step, now)
        if len(self._points) >= _BATCH or time.monotonic() - self._last_flush > self.FLUSH_SECS:
            self._flush()

    def on_test_loader_end(self, context: PhaseContext) -> None:
        if self._client is None:
            return
        loader, now = getattr(context, "test_loader_name", None) or "test", _now_ms()
        for key, value in (context.metrics_dict or {}).items():
            self._add(f"test/{loader}/{key}", value, context.epoch or 0, now)

    def on_epoch_end(self, context: PhaseContext) -> None:
        history = context.history or []
        if self._client is not None and history and history[-1].get("epoch") == context.epoch:
            self._epoch_points(history[-1:])
            self._flush()

    def on_training_end(self, context: PhaseContext) -> None:
        if self._client is None:
            return
        try:
            self._flush()
            best = Path(context.ckpt_dir) / (context.training_params or {}).get("ckpt_best_name", "ckpt_best.pth")
            if self.log_checkpoint and best.is_file():
                self._client.log_artifact(self.run_id, str(best))
            self._client.set_terminated(self.run_id, status=_status(context))
        except Exception as err:
            if context.exception is None:
                raise
            warnings.warn(f"MLflowLogger: could not close MLflow run {self.run_id}: {err}", stacklevel=2)
        finally:
            self._client, self._points = None, []

    # ---- helpers -------------------------------------------------------------------------------------
    def _experiment(self, context: PhaseContext) -> str:
        return self.experiment_name or context.experiment_name

    def _continued_run(self, run_name: str, uri: str) -> Any:
        """The checkpoint's MLflow run when this is a resume of the same run dir and the store still holds it."""
        if not self.run_id:
            return None
        try:
            run = self._client.get_run(self.run_id)
        except Exception:
            run = None
        if run is not None and run.info.lifecycle_stage == "active" and run.info.run_name == run_name:
            return run
        warnings.warn(f"MLflowLogger: the checkpoint's MLflow run {self.run_id} is not an active run named "
                      f"{run_name!r} in {uri}; logging to a new run", stacklevel=3)
        self.run_id = None
        return None

    def _log_params(self, params: Dict[str, str], logged: Mapping[str, str]) -> None:
        from mlflow.entities import Param

        changed = sorted(k for k, v in params.items() if k in logged and logged[k] != v and k != "resume")
        if changed:
            warnings.warn(f"MLflowLogger: MLflow params cannot change, so run {self.run_id} keeps its first values "
                          f"of {changed}; this run's values are in training_params.yaml", stacklevel=3)
        new = [Param(k, v) for k, v in params.items() if k not in logged]
        for start in range(0, len(new), 100):
            self._client.log_batch(self.run_id, params=new[start:start + 100])

    def _epoch_points(self, rows: List[Mapping[str, Any]]) -> None:
        now = _now_ms()
        for row in rows:
            for column, value in row.items():
                if column != "epoch":  # the step
                    self._add(column, value, int(row["epoch"]), now)

    def _add(self, key: str, value: Any, step: int, timestamp: int) -> None:
        from mlflow.entities import Metric

        number = _number(value)
        if number is not None:
            self._points.append(Metric(_mlflow_key(key), number, timestamp, step))

    def _flush(self) -> None:
        points, self._points = self._points, []
        for start in range(0, len(points), _BATCH):
            self._client.log_batch(self.run_id, metrics=points[start:start + _BATCH])
        self._last_flush = time.monotonic()


def _import_mlflow() -> Any:
    try:
        import mlflow
    except ImportError as err:
        raise ImportError(f"sg_logger 'mlflow' needs MLflow ({err}): pip install 'super-trainer[mlflow]'") from None
    return mlflow


def _open_experiment(tracking_uri: Optional[str], name: str, context: PhaseContext) -> Tuple[Any, str, str]:
    """The client, the id of experiment ``name`` (created when missing) and the tracking URI."""
    from mlflow import MlflowClient

    given = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    artifacts = None
    if given and len(urlparse(str(given)).scheme) > 1:  # a URI (a one-letter scheme is a Windows drive)
        uri = str(given)
    else:
        root = Path(context.ckpt_dir).parent.parent  # <ckpt_root_dir>/<experiment_name>/<run dir>
        folder = (Path(given) if given else default_store_dir(root)).resolve()
        folder.mkdir(parents=True, exist_ok=True)
        uri, artifacts = f"sqlite:///{folder / 'mlflow.db'}", (folder / "artifacts").as_uri()
    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        try:
            return client, client.create_experiment(name, artifact_location=artifacts), uri
        except Exception:  # created meanwhile by another process
            experiment = client.get_experiment_by_name(name)
            if experiment is None:
                raise
    if experiment.lifecycle_stage != "active":
        raise ValueError(f"sg_logger_params.experiment_name: MLflow experiment {name!r} is deleted in {uri}; "
                         "restore it (mlflow experiments restore) or choose another name")
    return client, experiment.experiment_id, uri


def _flat_params(params: Mapping[str, Any], prefix: str = "") -> Dict[str, str]:
    """Nested mappings joined with "."; values as text, objects as their repr, cut to MLflow's length limit."""
    try:
        from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH as limit
    except ImportError:
        limit = 500
    flat: Dict[str, str] = {}
    for key, value in params.items():
        name = _mlflow_key(f"{prefix}{key}")
        if isinstance(value, Mapping) and value:
            flat.update(_flat_params(value, f"{name}."))
        else:
            plain = value is None or isinstance(value, (bool, int, float, str, list, tuple))
            text = _ADDRESS.sub("", str(value) if plain else repr(value))  # the same on resume, in a new process
            flat[name] = text[:limit]
    return flat


_renamed: set = set()


def _mlflow_key(key: str) -> str:
    safe = _INVALID_KEY_CHARS.sub("_", key)
    if safe != key and key not in _renamed:  # once per key and process
        _renamed.add(key)
        warnings.warn(f"MLflowLogger: {key!r} is logged as {safe!r} (MLflow keys allow letters, digits, "
                      "'_', '-', '.', ' ', ':' and '/')", stacklevel=3)
    return safe


def _number(value: Any) -> Optional[float]:
    if isinstance(value, torch.Tensor):
        return float(value.item()) if value.numel() == 1 else None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    return None


def _now_ms() -> int:
    return int(time.time() * 1000)


def _status(context: PhaseContext) -> str:
    if context.exception is not None or context.stop_reason == "exception":
        return "FAILED"
    if context.stop_reason in ("interrupted", "terminated"):
        return "KILLED"
    return "FINISHED"
