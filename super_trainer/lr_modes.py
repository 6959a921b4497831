"""The names of LR schedules and warmups (``training_params.lr_mode`` / ``warmup_mode``), with SuperGradients'
class names as aliases, and their normalization. The schedules themselves are callbacks (``callbacks/lr.py``)."""
from __future__ import annotations

from typing import Any, Dict, Mapping, Optional

__all__ = ["LR_MODES", "WARMUP_MODES", "normalize_lr_mode", "normalize_warmup_mode"]


LR_MODES: Dict[str, str] = {
    "step": "step", "steplrscheduler": "step", "step_lr": "step",
    "cosine": "cosine", "cosinelrscheduler": "cosine",
    "poly": "poly", "polylrscheduler": "poly",
    "exp": "exp", "exponentiallrscheduler": "exp", "explrscheduler": "exp",
    "function": "function", "functionlrscheduler": "function",
}


WARMUP_MODES: Dict[str, str] = {
    "linear_epoch_step": "linear_epoch_step", "linearepochlrwarmup": "linear_epoch_step",
    "warmup_linear_epoch": "linear_epoch_step", "linear_epoch": "linear_epoch_step",
    "linear_batch_step": "linear_batch_step", "linearbatchlrwarmup": "linear_batch_step",
    "warmup_linear_step": "linear_batch_step", "linear_step": "linear_batch_step",
    "yolov5_warmup": "yolov5_warmup", "yolov5warmuplrcallback": "yolov5_warmup",  # SG 2.x; see callbacks/yolo_warmup.py
}


def normalize_lr_mode(value: Any) -> Any:
    """Canonical lr_mode name, a torch scheduler mapping unchanged, or ValueError listing valid modes."""
    if value is None or isinstance(value, Mapping):
        return value
    key = str(value).lower()
    if key in LR_MODES:
        return LR_MODES[key]
    valid = "None, 'step', 'poly', 'cosine', 'exp', 'function' or {TorchScheduler: {params}}"
    raise ValueError(f"training_params.lr_mode: unknown value {value!r}; valid: {valid}")


def normalize_warmup_mode(value: Any) -> Optional[str]:
    if value is None:
        return None
    key = str(value).lower()
    if key in WARMUP_MODES:
        return WARMUP_MODES[key]
    raise ValueError(
        f"training_params.warmup_mode: unknown value {value!r}; valid: 'linear_epoch_step', 'linear_batch_step', "
        "'yolov5_warmup'"
    )
