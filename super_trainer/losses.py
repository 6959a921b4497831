"""The criterion: built from ``training_params.loss`` (a registered name, ``{Name: {params}}``, an nn.Module or a
callable), with SuperGradients' loss names and its ``smooth_eps`` label smoothing, and the loss names that
become metrics_dict keys."""
from __future__ import annotations

import logging
from typing import Any, Callable, Dict, List, Mapping, Optional

import torch
import torch.nn as nn

from .metrics import loss_names
from .modules import compile_kwargs
from .registry import LOSSES, parse_spec

__all__ = ["build_criterion", "known_loss_names", "SG_LOSS_NAMES"]

logger = logging.getLogger("super_trainer")


def build_criterion(params: Mapping[str, Any], device: torch.device) -> Callable[..., Any]:
    spec = _sg_loss_name(params["loss"])
    name, _ = parse_spec(spec, "loss")
    if name is None:
        if not callable(spec):
            raise ValueError(f"training_params.loss: {spec!r} is not a loss; give a name like 'CrossEntropyLoss', "
                             "{Name: {params}}, an nn.Module or a callable")
        criterion = spec
    else:
        try:
            criterion = LOSSES.build(spec, **_sg_criterion_params(spec, dict(params.get("criterion_params") or {})))
        except ValueError as err:
            raise ValueError(f"training_params.loss: {err}") from None
        except TypeError as err:
            raise ValueError(f"training_params.criterion_params: {err}") from None
    if isinstance(criterion, nn.Module):
        criterion = criterion.to(device)
    if params.get("torch_compile_loss"):
        logger.info("torch_compile_loss: compiling the loss with %s", params.get("torch_compile_options") or {})
        criterion = torch.compile(criterion, **compile_kwargs(params))
    return criterion


#: SuperGradients' loss names (and its deprecated lower-case ones) for the torch losses they are.
SG_LOSS_NAMES = {"cross_entropy": "CrossEntropyLoss", "MSE": "MSELoss", "mse": "MSELoss"}


def _sg_loss_name(spec: Any) -> Any:
    """``spec`` with a SuperGradients loss name replaced by the torch one (unless the user registered that name)."""
    name, params = parse_spec(spec, "loss")
    if name not in SG_LOSS_NAMES or name in LOSSES:
        return spec
    return SG_LOSS_NAMES[name] if isinstance(spec, str) else {SG_LOSS_NAMES[name]: params}


#: SuperGradients' CrossEntropyLoss arguments that torch's lacks, with their "off" values.
_SG_CE_OFF = {"smooth_dist": None, "from_logits": True}


def _sg_criterion_params(spec: Any, given: Dict[str, Any]) -> Dict[str, Any]:
    """SG's ``smooth_eps`` (label smoothing) for a CrossEntropyLoss: torch's ``label_smoothing``, which computes
    the same loss, −((1−ε)·log p_y + ε·mean_c log p_c), for class-index targets."""
    name, spec_params = parse_spec(spec, "loss")
    if name is None or name == "_target_":
        return given
    try:
        factory = LOSSES.get(name)
    except ValueError:
        return given  # LOSSES.build names the unknown loss
    if not (isinstance(factory, type) and issubclass(factory, nn.CrossEntropyLoss)):
        return given
    merged = {**given, **spec_params}
    params = dict(given)
    if "smooth_eps" in merged:
        eps = merged["smooth_eps"]
        params.pop("smooth_eps", None)
        if eps is not None:
            if "label_smoothing" in merged:
                raise ValueError("training_params.criterion_params: give smooth_eps or label_smoothing, not both")
            params["label_smoothing"] = float(eps)
    for key, off in _SG_CE_OFF.items():
        if key in merged:
            if merged[key] != off:
                raise ValueError(f"training_params.criterion_params: SuperGradients' {key}={merged[key]!r} is not "
                                 f"supported (only {off!r}); use label_smoothing / smooth_eps")
            params.pop(key, None)
    return params


def known_loss_names(criterion: Any, params: Mapping[str, Any]) -> Optional[List[str]]:
    """Loss names known before the first batch; None when they depend on what the loss returns."""
    declared = params.get("loss_logging_items_names") or getattr(criterion, "component_names", None)
    if declared:
        return loss_names(criterion, list(declared))
    return None

