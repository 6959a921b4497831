"""Experiment loggers: ``experiment.log`` (BaseLogger) and TensorBoard event files (TensorBoardLogger).

The logger in use is ``context.sg_logger``; other callbacks may call its ``add_scalar``/``add_scalars``/
``add_text``/``add_image``/``add_images``/``add_histogram`` (with our argument names or SuperGradients' keyword names)
and SG's ``add_config``/``add_checkpoint``/``add_file`` (callbacks/sg_logger_api.py). Tags (SPEC §5): ``Train/<name>``,
``Valid/<name>``, ``LR/<param group>`` and
``Test/<loader>/<name>`` with the 0-based epoch as step; every ``log_interval`` optimizer steps also
``Step/Train/loss`` and ``Step/LR/<param group>`` with the global step as step. Only rank 0 writes.
"""
from __future__ import annotations

import itertools
import math
import re
import time
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple

import numpy as np
import torch

from ..distributed import is_main_process
from ..images import make_grid, to_hwc_uint8, write_png
from .base import Callback, PhaseContext, Priority
from .event_file import EventFile
from .sg_logger_api import SGLoggerAPI, sg_step, sg_value, to_chw

__all__ = ["BaseLogger", "TensorBoardLogger", "param_group_names", "named_param_groups"]


def param_group_names(optimizer: torch.optim.Optimizer) -> List[str]:
    """Display names of the optimizer's param groups: their ``name`` entry, else ``default`` / ``group_<i>``."""
    groups = optimizer.param_groups
    if len(groups) == 1:
        return [groups[0].get("name", "default")]
    return [g.get("name", f"group_{i}") for i, g in enumerate(groups)]


def named_param_groups(context: PhaseContext) -> List[Tuple[str, Dict[str, Any]]]:
    """(display name, param group) of every optimizer's groups, in order; with several optimizers (SPEC §8) the
    names are ``<optimizer>/<group>``."""
    optimizers = getattr(context, "optimizers", None)
    if not optimizers or len(optimizers) == 1:
        return list(zip(param_group_names(context.optimizer), context.optimizer.param_groups))
    return [(f"{name}/{group_name}", group) for name, handle in optimizers.items()
            for group_name, group in zip(param_group_names(handle.optimizer), handle.param_groups)]


def _scalar(value: Any) -> Optional[float]:
    if isinstance(value, torch.Tensor):
        return value.item() if value.numel() == 1 else None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    return None


class BaseLogger(SGLoggerAPI, Callback):
    """Writes metrics and lifecycle lines to ``<run dir>/experiment.log`` (appending on resume)."""

    priority = Priority.LOW  # log what other callbacks may have added to metrics_dict

    def __init__(self, log_dir: Optional[str] = None) -> None:
        self.log_dir: Optional[Path] = Path(log_dir) if log_dir else None
        self.enabled = False
        self.log_interval = 50
        self._file: Optional[Any] = None
        self._epoch_train_scalars: Optional[Dict[str, Any]] = None  # the train pass's, written at on_epoch_end

    def _ensure_open(self) -> None:
        """Open the files on first use (rank 0 only), so even writes at on_training_start by callbacks that
        run before this one are kept."""
        if self._file is None and self.log_dir is not None and is_main_process():
            self.log_dir.mkdir(parents=True, exist_ok=True)
            self._open()
            self.enabled = True

    # ---- the API other callbacks use -------------------------------------------------------------
    def add_scalars(self, scalars: Optional[Mapping[str, Any]] = None, step: Optional[int] = None, unit: str = "step", *,
                    tag_scalar_dict: Optional[Mapping[str, Any]] = None, global_step: Optional[int] = None) -> None:
        """Log several scalars at ``step`` (``unit`` only labels the experiment.log line); values that are
        not single numbers are skipped. SG's names: ``tag_scalar_dict``, ``global_step``."""
        scalars = sg_value(scalars, tag_scalar_dict, "scalars", "tag_scalar_dict") or {}
        step = sg_step(step, global_step)
        if not self.enabled:
            self._ensure_open()
            if not self.enabled:
                return
        values = {tag: v for tag, v in ((t, _scalar(x)) for t, x in scalars.items()) if v is not None}
        if values:
            self._write_scalars(values, step, unit)

    def add_scalar(self, tag: str, value: Any = None, step: Optional[int] = None, *, scalar_value: Any = None,
                   global_step: Optional[int] = None) -> None:
        """SG's names: ``scalar_value``, ``global_step``."""
        self.add_scalars({tag: sg_value(value, scalar_value, "value", "scalar_value")}, sg_step(step, global_step))

    def add_text(self, tag: str, text: Optional[str] = None, step: Optional[int] = None, *,
                 text_string: Optional[str] = None, global_step: Optional[int] = None) -> None:
        """SG's names: ``text_string``, ``global_step``."""
        text, step = sg_value(text, text_string, "text", "text_string"), sg_step(step, global_step)
        self._ensure_open()
        if self.enabled:
            self.log_line(f"{tag} (step {step}): {text}")

    def add_image(self, tag: str, image: Any, step: Optional[int] = None, *, data_format: str = "CHW",
                  global_step: Optional[int] = None) -> None:
        """Log one image shaped ``(C, H, W)`` (C in 1, 3, 4) or ``(H, W)`` (SG's ``data_format`` names another
        layout, e.g. "HWC"): floats in [0, 1], or integers 0–255. The base logger saves
        ``<run dir>/images/<tag>_<step>.png`` ("/" in tags becomes "_")."""
        step = sg_step(step, global_step)
        self._ensure_open()
        if self.enabled:
            self._write_image(tag, to_hwc_uint8(to_chw(image, data_format)), step)

    def add_images(self, tag: str, images: Any, step: Optional[int] = None, *, data_format: str = "NCHW",
                   global_step: Optional[int] = None) -> None:
        """Log a batch ``(N, C, H, W)`` (or SG's ``data_format="NHWC"``) as one grid image (each image scaled to
        [0, 1] by its min and max)."""
        self.add_image(tag, make_grid(to_chw(images, data_format)), sg_step(step, global_step))

    def add_histogram(self, tag: str, values: Any, step: Optional[int] = None, *, bins: Any = "auto",
                      global_step: Optional[int] = None) -> None:
        """Log the distribution of ``values`` (any tensor/array). The base logger writes one
        experiment.log line with count, min, max, mean and std (it draws no histogram); TensorBoard's uses ``bins``."""
        step = sg_step(step, global_step)
        self._ensure_open()
        if self.enabled:
            array = _as_numpy(values)
            self._write_histogram(tag, array, step, bins)

    def _write_image(self, tag: str, image: np.ndarray, step: int) -> None:
        folder = self.log_dir / "images"
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{_safe_tag(tag)}_{step}.png"
        write_png(path, image)
        self.log_line(f"image {tag} (step {step}): {path}")

    def _write_histogram(self, tag: str, values: np.ndarray, step: int, bins: Any = "auto") -> None:
        if values.size == 0:
            self.log_line(f"histogram {tag} (step {step}): empty")
            return
        self.log_line(f"histogram {tag} (step {step}): count={values.size} min={_fmt(float(values.min()))} "
                      f"max={_fmt(float(values.max()))} mean={_fmt(float(values.mean()))} "
                      f"std={_fmt(float(values.std()))}")

    def log_line(self, text: str) -> None:
        if self._file is not None:
            self._file.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {text}\n")
            self._file.flush()

    def flush(self) -> None:
        """Make everything logged so far visible on disk (called at the end of every epoch-level event, and before
        an evaluation pass)."""
        if self._file is not None:
            self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def _write_scalars(self, values: Dict[str, float], step: int, unit: str) -> None:
        shown = "  ".join(f"{tag}={_fmt(v)}" for tag, v in values.items())
        self.log_line(f"{unit} {step}  {shown}")

    # ---- events ------------------------------------------------------------------------------------
    def on_training_start(self, context: PhaseContext) -> None:
        if self.log_dir is None:
            self.log_dir = Path(context.ckpt_dir)
        if context.training_params is not None:
            self.log_interval = int(context.training_params.get("log_interval", 50))
        self._ensure_open()
        if self.enabled:
            self.log_line(f"training {context.experiment_name!r} from epoch {context.epoch} on {context.device}")

    def _open(self) -> None:
        self._file = open(self.log_dir / "experiment.log", "a", encoding="utf-8")

    def on_train_batch_gradient_step_end(self, context: PhaseContext) -> None:
        if self.enabled and context.global_step % self.log_interval == 0:
            updating = context.optimizer_name  # several optimizers: the one that just stepped
            scalars: Dict[str, Any] = {"Step/Train/loss" + (f"/{updating}" if updating else ""): context.loss}
            for name, group in named_param_groups(context):
                if updating is None or name.startswith(updating + "/"):
                    scalars[f"Step/LR/{name}"] = group["lr"]
            self.add_scalars(scalars, context.global_step)

    def on_train_loader_end(self, context: PhaseContext) -> None:
        scalars = {f"Train/{k}": v for k, v in (context.metrics_dict or {}).items()}
        # the lrs the epoch trained with, captured before epoch-end schedules (step mode) change them
        groups = named_param_groups(context)
        lrs = context.epoch_lrs or [g["lr"] for _, g in groups]
        for (name, _), lr in zip(groups, lrs):
            scalars[f"LR/{name}"] = lr
        self._epoch_train_scalars = scalars  # written at on_epoch_end: a partial epoch is not an epoch's point

    def on_validation_loader_start(self, context: PhaseContext) -> None:
        self.flush()  # the train pass's points are on disk while the evaluation runs (it may take long)

    on_test_loader_start = on_validation_loader_start

    def on_epoch_end(self, context: PhaseContext) -> None:
        scalars, self._epoch_train_scalars = self._epoch_train_scalars, None
        if scalars:
            self.add_scalars(scalars, context.epoch, unit="epoch")
        self.flush()

    def on_validation_loader_end(self, context: PhaseContext) -> None:
        # with val_check_interval an epoch may hold several validations: they are placed by global_step
        by_step = (context.training_params or {}).get("val_check_interval") is not None
        step, unit = (context.global_step, "step") if by_step else (context.epoch, "epoch")
        self.add_scalars({f"Valid/{k}": v for k, v in (context.metrics_dict or {}).items()}, step, unit)
        self.flush()

    def on_test_loader_end(self, context: PhaseContext) -> None:
        loader = context.test_loader_name or "test"
        step = context.epoch if context.epoch is not None else 0
        self.add_scalars({f"Test/{loader}/{k}": v for k, v in (context.metrics_dict or {}).items()}, step, "epoch")
        self.flush()

    def on_training_end(self, context: PhaseContext) -> None:
        if self.enabled:
            reason = context.stop_reason or "completed"
            if context.exception is not None:
                reason = f"exception {type(context.exception).__name__}: {context.exception}"
            self.log_line(f"training ended: {reason}")
        self.close()
        self.enabled = False  # a later train() with this logger reopens the files


class TensorBoardLogger(BaseLogger):
    """BaseLogger plus TensorBoard event files in the run dir.

    Scalars are queued and written to the event file (:class:`~super_trainer.callbacks.event_file.EventFile`, on
    this thread) at epoch-level events and at least every ``flush_secs`` seconds: encoding a record is Python work,
    which the batch loop need not pay for at every step.
    """

    def __init__(self, log_dir: Optional[str] = None, flush_secs: float = 30.0) -> None:
        super().__init__(log_dir)
        self.flush_secs = flush_secs
        self.writer: Optional[Any] = None
        self._pending: List[tuple] = []
        self._last_flush = time.monotonic()
        # purge_step: a resumed run drops the points an interrupted run logged after its checkpoint (TensorBoard
        # discards every point at or past it). Epoch-level points use the epoch as step, which stays below
        # global_step + 1 (every epoch takes at least one step), so only the step-level points past it go.
        self._purge_step: Optional[int] = None

    def _open(self) -> None:
        super()._open()
        self._new_writer()

    def _new_writer(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.writer = EventFile(self.log_dir, purge_step=self._purge_step)

    def _write_scalars(self, values: Dict[str, float], step: int, unit: str) -> None:
        super()._write_scalars(values, step, unit)
        self._pending.extend((tag, value, step) for tag, value in values.items())
        if time.monotonic() - self._last_flush > self.flush_secs:
            self.flush()

    def add_text(self, tag: str, text: Optional[str] = None, step: Optional[int] = None, *,
                 text_string: Optional[str] = None, global_step: Optional[int] = None) -> None:
        text, step = sg_value(text, text_string, "text", "text_string"), sg_step(step, global_step)
        super().add_text(tag, text, step)
        if self.writer is not None:
            self.writer.add_text(tag, text, step)

    def _write_image(self, tag: str, image: np.ndarray, step: int) -> None:
        """Images go to TensorBoard only (no PNG files): they are rare, so no queue as for scalars."""
        self.writer.add_image(tag, image, step, dataformats="HWC")

    def _write_histogram(self, tag: str, values: np.ndarray, step: int, bins: Any = "auto") -> None:
        if values.size:
            self.writer.add_histogram(tag, values, step, bins=bins)

    def flush(self) -> None:
        super().flush()
        if self.writer is not None:
            for step, points in itertools.groupby(self._pending, key=lambda point: point[2]):
                self.writer.add_scalars([(tag, value) for tag, value, _ in points], step)  # one event per step
            self._pending.clear()
            self.writer.flush()
        self._last_flush = time.monotonic()

    def on_training_start(self, context: PhaseContext) -> None:
        # a resumed run continues after the checkpoint's step, which was logged before the checkpoint was taken
        self._purge_step = context.global_step + 1 if context.global_step else None
        if self.writer is not None and self._purge_step:  # opened by a write before this event: reopen
            self._new_writer()
        super().on_training_start(context)

    def close(self) -> None:
        self.flush()
        super().close()
        if self.writer is not None:
            self.writer.close()
            self.writer = None


def _safe_tag(tag: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", tag).strip("_") or "image"


def _as_numpy(values: Any) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        return values.detach().float().cpu().reshape(-1).numpy()
    return np.asarray(values, dtype=np.float64).reshape(-1)


def _fmt(value: float) -> str:
    if math.isfinite(value) and value == int(value) and abs(value) < 1e12:
        return str(int(value))
    return f"{value:.6g}"
