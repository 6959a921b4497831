"""The parts of SuperGradients' ``sg_logger`` API that super_trainer's loggers add to their own (SPEC §8): SG's keyword
names (``scalar_value``, ``global_step``, ``tag_scalar_dict``, ``text_string``, ``data_format``, ``bins``) and
``add_config``, ``add_checkpoint``, ``add_file``, ``local_dir``, ``upload``. ``BaseLogger`` mixes it in."""
from __future__ import annotations

import json
from collections import OrderedDict
from pathlib import Path
from typing import Any, Mapping, Optional

import numpy as np
import torch

from ..checkpoint import save_checkpoint
from ..distributed import is_main_process

__all__ = ["SGLoggerAPI", "sg_value", "sg_step", "to_chw"]


def sg_value(ours: Any, sg: Any, our_name: str, sg_name: str) -> Any:
    """The argument given under our name or SG's (not both)."""
    if ours is not None and sg is not None:
        raise TypeError(f"give {our_name} or SuperGradients' {sg_name}, not both")
    return sg if ours is None else ours


def sg_step(step: Optional[int], global_step: Optional[int]) -> int:
    """The step from ``step`` or SG's ``global_step``; 0 when neither is given (SG's default None)."""
    value = sg_value(step, global_step, "step", "global_step")
    return 0 if value is None else int(value)


_LAYOUTS = {"CHW": None, "HW": None, "HWC": (2, 0, 1), "WH": (1, 0), "NCHW": None, "NHWC": (0, 3, 1, 2)}


def to_chw(image: Any, data_format: str) -> torch.Tensor:
    """``image`` laid out as ``data_format`` (SG's names: CHW, HWC, HW, WH; NCHW, NHWC for batches) in our layout
    (C, H, W) / (H, W) / (N, C, H, W)."""
    layout = str(data_format).upper()
    if layout not in _LAYOUTS:
        raise ValueError(f"data_format {data_format!r}: use one of {', '.join(_LAYOUTS)}")
    tensor = image.detach().cpu() if isinstance(image, torch.Tensor) else torch.as_tensor(np.asarray(image))
    if tensor.dim() != len(layout):
        raise ValueError(f"data_format {layout} needs a {len(layout)}-d image, got shape {tuple(tensor.shape)}")
    order = _LAYOUTS[layout]
    return tensor.permute(*order) if order else tensor


def _plain(state: Any) -> Any:
    """DictConfig / ListConfig as plain containers, recursively (SG's logger sanitizes checkpoints the same way)."""
    from omegaconf import DictConfig, ListConfig, OmegaConf

    if isinstance(state, (DictConfig, ListConfig)):
        return OmegaConf.to_container(state, resolve=True)
    if isinstance(state, OrderedDict):  # a state_dict keeps its type
        return OrderedDict((k, _plain(v)) for k, v in state.items())
    if isinstance(state, Mapping):
        return {k: _plain(v) for k, v in state.items()}
    if isinstance(state, (list, tuple)):
        return type(state)(_plain(v) for v in state)
    return state


class SGLoggerAPI:
    """SG's ``sg_logger`` methods with no counterpart in our own API. Needs ``log_dir``, ``_ensure_open``, ``enabled``,
    ``log_line``, ``add_text`` and ``flush`` from the logger it is mixed into."""

    log_dir: Optional[Path]
    enabled: bool

    def add_config(self, tag: str, config: Mapping[str, Any]) -> None:
        """Log a configuration as JSON: an experiment.log block (and a TensorBoard text with the TensorBoard logger)."""
        self.add_text(tag, json.dumps(_plain(config), indent=4, default=str))

    def add_checkpoint(self, tag: Optional[str], state_dict: Mapping[str, Any], global_step: Optional[int] = None) -> None:
        """Save ``state_dict`` as ``<experiment dir>/<tag>.pth`` (``ckpt_<global_step>.pth`` when tag is None), written
        atomically by rank 0, OmegaConf containers turned into plain ones, as SG's logger does."""
        name = f"ckpt_{global_step}.pth" if tag is None else str(tag)
        if not name.endswith(".pth"):
            name += ".pth"
        if Path(name).name != name:
            raise ValueError(f"add_checkpoint: tag {tag!r} must be a file name inside the experiment dir")
        self._ensure_open()  # type: ignore[attr-defined]
        if not self.enabled or self.log_dir is None or not is_main_process():
            return
        path = save_checkpoint(_plain(dict(state_dict)), self.log_dir / name)
        self.log_line(f"checkpoint {name}: {path}")  # type: ignore[attr-defined]

    def add_file(self, file_name: Optional[str] = None) -> None:
        """SG uploads the file to its remote storage; super_trainer has none, so the file stays in the experiment dir
        and experiment.log records it."""
        self._ensure_open()  # type: ignore[attr-defined]
        if self.enabled:
            self.log_line(f"file {file_name}: kept in {self.log_dir} (no remote storage)")  # type: ignore[attr-defined]

    def local_dir(self) -> str:
        """The experiment dir the logger writes into."""
        return str(self.log_dir) if self.log_dir is not None else ""

    def upload(self) -> None:
        """SG's upload to remote storage: here, flush what is written (there is no remote storage)."""
        self.flush()  # type: ignore[attr-defined]
