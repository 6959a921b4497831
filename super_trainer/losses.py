"""The criterion: built from ``training_params.loss`` (a registered name, ``{Name: {params}}``, an nn.Module or a
callable), with SuperGradients' loss names and its ``smooth_eps`` label smoothing, and the loss names that
become metrics_dict keys."""
from __future__ import annotations

import logging
import warnings
from collections.abc import MutableMapping
from typing import Any, Callable, Dict, List, Mapping, Optional

import torch
import torch.nn as nn

from .metrics import loss_names
from .modules import compile_kwargs, move_to
from .registry import LOSSES, parse_spec
from .sg_compat import as_named_spec
from .steps import ModelOwnLoss, uses_model_loss

__all__ = ["build_criterion", "known_loss_names", "SG_LOSS_NAMES", "is_loss_key", "resolve_metric_direction",
           "check_loss_value"]

logger = logging.getLogger("super_trainer")


def build_criterion(params: Mapping[str, Any], device: torch.device) -> Callable[..., Any]:
    if uses_model_loss(params["loss"]):  # loss: null / "model": the model computes its own (SPEC §8)
        return ModelOwnLoss()
    spec = _sg_loss_name(as_named_spec(params["loss"], LOSSES))  # an SG _target_ loss as {Name: params}
    name, spec_params = parse_spec(spec, "loss")
    given = dict(params.get("criterion_params") or {})
    if name not in (None, "_target_") and spec_params:  # {Name: params} as Name + criterion_params (its own win),
        spec, given = name, {**given, **spec_params}  # so SG's smooth_eps is translated wherever it is given
    if name is None:
        if not callable(spec):
            raise ValueError(f"training_params.loss: {spec!r} is not a loss; give a name like 'CrossEntropyLoss', "
                             "{Name: {params}}, an nn.Module or a callable")
        criterion = spec
    else:
        try:
            criterion = LOSSES.build(spec, **_sg_criterion_params(spec, given))
        except ValueError as err:
            raise ValueError(f"training_params.loss: {err}") from None
        except TypeError as err:
            raise ValueError(f"training_params.criterion_params: {err}") from None
    if isinstance(criterion, nn.Module):
        criterion = move_to(criterion, device)  # on the CPU: no walk when nothing needs moving
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
    return loss_names(criterion, list(declared)) if declared else None


def is_loss_key(metric: str, criterion: Any, names: Optional[List[str]]) -> bool:
    """Whether ``metric`` names one of the criterion's metrics_dict keys (case-insensitive, as lookups are):
    ``names`` when known, else the loss's name or one of its ``Name/<component>`` keys."""
    base = getattr(criterion, "__name__", None) or type(criterion).__name__
    lowered = str(metric).lower()
    if names:
        return any(lowered == n.lower() for n in names)
    return lowered == base.lower() or lowered.startswith(base.lower() + "/")


def resolve_metric_direction(params: MutableMapping, criterion: Any, names: Optional[List[str]]) -> bool:
    """Settle ``greater_metric_to_watch_is_better`` in ``params`` and return it: unset (None) means False when
    ``metric_to_watch`` is a loss key and True otherwise; an explicit True on a loss key warns (the best epoch
    would be the one with the highest loss)."""
    metric = params["metric_to_watch"]
    given = params.get("greater_metric_to_watch_is_better")
    watching_loss = is_loss_key(metric, criterion, names)
    if given is None:
        params["greater_metric_to_watch_is_better"] = not watching_loss
    elif given is True and watching_loss:
        warnings.warn(f"training_params.greater_metric_to_watch_is_better is true but metric_to_watch {metric!r} is "
                      "a loss: ckpt_best.pth and the best epoch will be the ones with the HIGHEST loss; set it to "
                      "false (or leave it unset: a loss key defaults to false)", UserWarning, stacklevel=3)
    return bool(params["greater_metric_to_watch_is_better"])


def check_loss_value(loss: Any, criterion: Any) -> None:
    """ValueError unless ``loss`` (what the criterion returned, or the first item of its ``(loss, components)``
    tuple) is a 0-d floating tensor that backward can start from. For the loop: once, on the first batch."""
    name = getattr(criterion, "__name__", None) or type(criterion).__name__
    if not isinstance(loss, torch.Tensor):
        raise ValueError(f"training_params.loss: {name} returned a {type(loss).__name__} ({loss!r:.40}), not a tensor; "
                         "return a 0-d torch tensor computed from the predictions (a Python number has no gradient)")
    if loss.dim() != 0:
        raise ValueError(f"training_params.loss: {name} returned a tensor of shape {tuple(loss.shape)}, not a "
                         "scalar; reduce it to one number (e.g. reduction='mean', or return (loss, components) with a "
                         "0-d loss)")
    if not loss.is_floating_point():
        raise ValueError(f"training_params.loss: {name} returned a {loss.dtype} tensor; a loss must be floating point")
    if not loss.requires_grad and torch.is_grad_enabled():
        raise ValueError(f"training_params.loss: {name} returned a loss that does not depend on any trainable "
                         "parameter (computed from detached predictions or with .item()?); backward would have "
                         "nothing to train")

