"""Log image grids of a batch's inputs through the experiment logger."""
from __future__ import annotations

from typing import Any, Optional

import torch

from .base import Callback, PhaseContext

__all__ = ["BatchVisualizationCallback"]

_EVENTS = {"train": "on_train_batch_end", "valid": "on_validation_batch_end", "test": "on_test_batch_end"}
_ALIASES = {"train": "train", "training": "train", "valid": "valid", "validation": "valid", "val": "valid",
            "test": "test"}


class BatchVisualizationCallback(Callback):
    """Logs the first ``max_images`` inputs of batch ``batch_idx`` as one grid image on epochs 0, ``freq``,
    2·``freq``, … (every test pass for phase "test").

    ``phase``: "train" (at on_train_batch_end), "valid" (on_validation_batch_end) or "test"
    (on_test_batch_end). Inputs must be images ``(N, C, H, W)`` with C in 1, 3, 4 (or ``(N, H, W)``); each
    image is scaled to [0, 1] by its own min and max. The image goes to ``context.sg_logger.add_images``
    with tag ``"<Phase>/batch_<batch_idx>"`` (override with ``tag``) and the 0-based epoch as step:
    TensorBoard shows it under Images; the base logger writes ``images/<tag>_<epoch>.png`` in the
    run dir. Only on logged batches is anything copied to the host.
    """

    def __init__(self, phase: str = "train", freq: int = 1, max_images: int = 16, batch_idx: int = 0,
                 tag: Optional[str] = None) -> None:
        key = _ALIASES.get(str(phase).lower())
        if key is None:
            raise ValueError(f"BatchVisualizationCallback phase must be one of 'train', 'valid', 'test'; got {phase!r}")
        for name, value, low in (("freq", freq, 1), ("max_images", max_images, 1), ("batch_idx", batch_idx, 0)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"BatchVisualizationCallback {name} must be an int >= {low}, got {value!r}")
        self.phase = key
        self.freq = freq
        self.max_images = max_images
        self.batch_idx = batch_idx
        self.tag = tag or f"{key.capitalize()}/batch_{batch_idx}"
        setattr(self, _EVENTS[key], self._maybe_log)  # receive only the one event (like PhaseCallback)

    def on_training_start(self, context: PhaseContext) -> None:
        if context.sg_logger is not None and not callable(getattr(context.sg_logger, "add_images", None)):
            raise ValueError(f"BatchVisualizationCallback: the logger {type(context.sg_logger).__name__} has no "
                             "add_images(tag, images, step); use sg_logger 'tensorboard' or 'base'")

    def _maybe_log(self, context: PhaseContext) -> None:
        if context.batch_idx != self.batch_idx or context.sg_logger is None:
            return
        epoch = context.epoch or 0
        if epoch % self.freq and self.phase != "test":
            return
        inputs: Any = context.inputs
        if not isinstance(inputs, torch.Tensor):
            raise ValueError(f"BatchVisualizationCallback: inputs must be an image tensor (N, C, H, W), got "
                             f"{type(inputs).__name__}")
        context.sg_logger.add_images(self.tag, inputs[: self.max_images].detach().float().cpu(), epoch)

    def __repr__(self) -> str:
        return f"BatchVisualizationCallback({self.phase!r}, freq={self.freq}, max_images={self.max_images})"
