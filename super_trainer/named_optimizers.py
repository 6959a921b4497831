"""Several optimizers (SPEC §8, GANs and mmedit's loops): ``optimizer`` given as a mapping name →
``{optimizer, initial_lr, optimizer_params, params}`` (or name → an Optimizer instance).

``params`` names a submodule attribute (``"generator"``, ``"backbone.layer4"``) or a parameter-name prefix
(a string, or a list of them); every trainable parameter must be in exactly one optimizer. Each entry is built as
one optimizer would be from ``training_params`` (its ``initial_lr`` may be a number or a ``{prefix: lr, "default":
lr}`` mapping over the full parameter names; SuperGradients' ``optimizer_params`` defaults apply per class), so LR
schedules, warmup and ``initial_lr`` mappings work per optimizer. An entry without ``initial_lr`` takes the
top-level one.
"""
from __future__ import annotations

from typing import Any, Dict, Iterator, List, Mapping, Sequence, Tuple

import torch
import torch.nn as nn

from .optimizers import build_optimizer
from .params import NAMED_OPTIMIZER_KEYS, TrainingParams, is_named_optimizers

__all__ = ["build_optimizers", "DEFAULT_NAME"]

#: The name of the one optimizer of a run that does not give a mapping.
DEFAULT_NAME = "default"


def build_optimizers(net: nn.Module, params: TrainingParams) -> Dict[str, torch.optim.Optimizer]:
    """The run's optimizers by name, in the given order: ``{"default": optimizer}`` for one optimizer."""
    if not is_named_optimizers(params.optimizer):
        return {DEFAULT_NAME: build_optimizer(net, params)}
    if callable(getattr(net, "initialize_param_groups", None)):
        raise ValueError(f"training_params.optimizer: with several optimizers each one's param groups come from its "
                         f"'params'; {type(net).__name__}.initialize_param_groups would not be used (give one "
                         "optimizer, or remove the method)")
    members = _members(net, params.optimizer)
    _check_every_parameter_once(net, members)
    built: Dict[str, torch.optim.Optimizer] = {}
    for name, entry in params.optimizer.items():
        if isinstance(entry, torch.optim.Optimizer):
            for group in entry.param_groups:
                group.setdefault("initial_lr", group["lr"])
            built[name] = entry
            continue
        sub = _entry_params(params, name, entry)
        built[name] = build_optimizer(_ParamView(net, members[name]), sub)
        entry["optimizer_params"] = sub["optimizer_params"]  # training_params.yaml shows what was built
    return built


def _entry_params(params: TrainingParams, name: str, entry: Mapping[str, Any]) -> TrainingParams:
    """The training_params one optimizer is built from; ValueError naming ``optimizer.<name>.<key>``."""
    where = f"training_params.optimizer.{name}"
    unknown = sorted(set(entry) - set(NAMED_OPTIMIZER_KEYS))
    if unknown:
        raise ValueError(f"{where}: unknown keys {unknown}; an entry has {list(NAMED_OPTIMIZER_KEYS)}")
    kind = entry.get("optimizer", "SGD")
    if isinstance(kind, torch.optim.Optimizer):
        raise ValueError(f"{where}.optimizer: give the instance itself as optimizer.{name}, not inside an entry")
    lr = entry.get("initial_lr", params.initial_lr)
    if lr is None:
        raise ValueError(f"{where}.initial_lr is required (or a top-level initial_lr): a number, or "
                         "{param-name prefix: lr, 'default': lr}")
    lrs = lr.values() if isinstance(lr, Mapping) else [lr]
    if any(isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0 for v in lrs):
        raise ValueError(f"{where}.initial_lr: must be a number >= 0 or {{prefix: lr}}, got {lr!r}")
    options = entry.get("optimizer_params") or {}
    if not isinstance(options, Mapping):
        raise ValueError(f"{where}.optimizer_params: must be a mapping, got {options!r}")
    sub = TrainingParams(params)
    sub.update(optimizer=kind, initial_lr=lr, optimizer_params=dict(options))
    return sub


def _members(net: nn.Module, spec: Mapping[str, Any]) -> Dict[str, List[Tuple[str, nn.Parameter]]]:
    """Each optimizer's (name, parameter) pairs, by its ``params`` (or its instance's parameters)."""
    named = list(net.named_parameters())
    by_id = {id(p): n for n, p in named}
    members: Dict[str, List[Tuple[str, nn.Parameter]]] = {}
    for name, entry in spec.items():
        if isinstance(entry, torch.optim.Optimizer):
            params = [p for group in entry.param_groups for p in group["params"]]
            foreign = [p for p in params if id(p) not in by_id]
            if foreign:
                raise ValueError(f"training_params.optimizer.{name}: the optimizer holds {len(foreign)} parameters the "
                                 f"model does not own (shape {tuple(foreign[0].shape)}); build it from the model given "
                                 "to train()")
            members[name] = [(by_id[id(p)], p) for p in params]
            continue
        if not isinstance(entry, Mapping) or "params" not in entry:
            raise ValueError(f"training_params.optimizer.{name}: 'params' is required: a submodule attribute "
                             "('generator') or a parameter-name prefix that selects this optimizer's parameters")
        prefixes = _prefixes(net, name, entry["params"])
        members[name] = [(n, p) for n, p in named if any(n.startswith(prefix) for prefix in prefixes)]
        if not members[name]:
            raise ValueError(f"training_params.optimizer.{name}.params: {entry['params']!r} selects no parameter "
                             f"(names look like {[n for n, _ in named][:5]})")
    return members


def _prefixes(net: nn.Module, name: str, given: Any) -> List[str]:
    values = [given] if isinstance(given, str) else list(given) if isinstance(given, Sequence) else None
    if not values or not all(isinstance(v, str) and v for v in values):
        raise ValueError(f"training_params.optimizer.{name}.params: must be a submodule attribute or a "
                         f"parameter-name prefix (a string, or a list of them), got {given!r}")
    prefixes = []
    for value in values:
        try:
            is_module = isinstance(net.get_submodule(value), nn.Module)
        except AttributeError:
            is_module = False
        prefixes.append(value + "." if is_module else value)
    return prefixes


def _check_every_parameter_once(net: nn.Module, members: Mapping[str, List[Tuple[str, nn.Parameter]]]) -> None:
    owners: Dict[int, List[str]] = {}
    for name, pairs in members.items():
        for _, param in pairs:
            owners.setdefault(id(param), []).append(name)
    twice = [(n, owners[id(p)]) for n, p in net.named_parameters() if len(owners.get(id(p), [])) > 1]
    if twice:
        raise ValueError(f"training_params.optimizer: parameter {twice[0][0]!r} is selected by optimizers "
                         f"{twice[0][1]}; every trainable parameter must be in exactly one optimizer")
    missing = [n for n, p in net.named_parameters() if p.requires_grad and id(p) not in owners]
    if missing:
        raise ValueError(f"training_params.optimizer: trainable parameters {missing[:3]} are in no optimizer; every "
                         "trainable parameter must be in exactly one (widen a 'params', or freeze them)")


class _ParamView:
    """The part of a model one optimizer trains, with the model's full parameter names, for ``build_optimizer``
    (param groups by ``initial_lr`` prefix, no weight decay on biases and norms)."""

    def __init__(self, net: nn.Module, members: List[Tuple[str, nn.Parameter]]) -> None:
        self.net = net
        self.members = members
        self.ids = {id(p) for _, p in members}

    def named_parameters(self) -> Iterator[Tuple[str, nn.Parameter]]:
        return iter(self.members)

    def parameters(self) -> Iterator[nn.Parameter]:
        return (p for _, p in self.members)

    def named_modules(self) -> Iterator[Tuple[str, nn.Module]]:
        return ((n, m) for n, m in self.net.named_modules()
                if any(id(p) in self.ids for p in m.parameters(recurse=False)))
