"""Optimizers: building one from training_params (its param groups, SuperGradients' defaults), telling whether
its step needs a closure, and the optimizers torch.optim lacks, registered by name: ``RMSpropTF``
(SuperGradients' / TensorFlow's RMSprop) and ``Lamb`` (SuperGradients' Lamb, the NVIDIA FusedLAMB variant).

``build_optimizer`` merges the per-optimizer ``optimizer_params`` defaults SuperGradients 3.7 applies when a
recipe omits them (SPEC §7) under the recipe's own values.
"""
from __future__ import annotations

import inspect
import math
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Tuple, Union

import torch
import torch.nn as nn

from . import sam as _sam  # noqa: F401  (registers the SAM optimizer)
from .params import TrainingParams
from .registry import OPTIMIZERS, parse_spec
from .sg_compat import warn_unread_sg_keys

__all__ = ["RMSpropTF", "Lamb", "SG_OPTIMIZER_DEFAULTS", "sg_optimizer_defaults", "build_optimizer", "param_groups",
           "model_param_groups", "no_decay_names", "step_takes_closure", "check_trainable", "check_owned_parameters"]


def _evaluate(closure: Optional[Callable[[], Any]]) -> Any:
    """What an optimizer's ``step(closure)`` does first: the loss (with gradients) from the closure, if given."""
    if closure is None:
        return None
    with torch.enable_grad():
        return closure()


@OPTIMIZERS.register
class RMSpropTF(torch.optim.Optimizer):
    """RMSprop as TensorFlow (and SuperGradients' ``RMSpropTF``) computes it. Per parameter, with gradient g:

    - g ← g + weight_decay·p (or, with ``decoupled_decay``, p ← p·(1 − weight_decay) first)
    - v ← v + (1 − alpha)·(g² − v), with v starting at **ones** (torch's RMSprop starts at zeros)
    - centered: m ← m + (1 − alpha)·(g − m), d = sqrt(v − m² + eps); else d = sqrt(v + eps) (eps inside the sqrt)
    - momentum > 0: b ← momentum·b + lr·g/d, p ← p − b (lr inside the buffer, ``lr_in_momentum=True``), or
      b ← momentum·b + g/d, p ← p − lr·b; without momentum p ← p − lr·g/d.
    """

    closure_evaluated_first = True  # step() only evaluates a closure before changing the weights, as torch's do

    def __init__(self, params: Union[Iterable[torch.Tensor], Iterable[Dict[str, Any]]], lr: float = 1e-2,
                 alpha: float = 0.9, eps: float = 1e-10, weight_decay: float = 0.0, momentum: float = 0.0,
                 centered: bool = False, decoupled_decay: bool = False, lr_in_momentum: bool = True) -> None:
        for name, value in (("lr", lr), ("alpha", alpha), ("eps", eps), ("weight_decay", weight_decay),
                            ("momentum", momentum)):
            if value < 0.0:
                raise ValueError(f"RMSpropTF: {name} must be >= 0, got {value!r}")
        defaults = dict(lr=lr, alpha=alpha, eps=eps, weight_decay=weight_decay, momentum=momentum, centered=centered,
                        decoupled_decay=decoupled_decay, lr_in_momentum=lr_in_momentum)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], Any]] = None) -> Any:
        loss = _evaluate(closure)
        for group in self.param_groups:
            lr, alpha, eps = group["lr"], group["alpha"], group["eps"]
            decay, momentum = group["weight_decay"], group["momentum"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad
                if grad.is_sparse:
                    raise RuntimeError("RMSpropTF does not support sparse gradients")
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["square_avg"] = torch.ones_like(p)
                    if momentum > 0:
                        state["momentum_buffer"] = torch.zeros_like(p)
                    if group["centered"]:
                        state["grad_avg"] = torch.zeros_like(p)
                state["step"] += 1
                if decay != 0:
                    if group["decoupled_decay"]:
                        p.mul_(1.0 - decay)
                    else:
                        grad = grad + decay * p
                square_avg = state["square_avg"]
                square_avg.add_((grad * grad - square_avg) * (1.0 - alpha))
                if group["centered"]:
                    grad_avg = state["grad_avg"]
                    grad_avg.add_((grad - grad_avg) * (1.0 - alpha))
                    denom = (square_avg - grad_avg * grad_avg + eps).sqrt()
                else:
                    denom = (square_avg + eps).sqrt()
                if momentum > 0:
                    buf = state["momentum_buffer"]
                    buf.mul_(momentum)
                    if group["lr_in_momentum"]:
                        buf.addcdiv_(grad, denom, value=lr)
                        p.sub_(buf)
                    else:
                        buf.addcdiv_(grad, denom)
                        p.sub_(buf * lr)
                else:
                    p.addcdiv_(grad, denom, value=-lr)
        return loss


@OPTIMIZERS.register
class Lamb(torch.optim.Optimizer):
    """LAMB as SuperGradients 3.7's ``Lamb`` computes it (the NVIDIA FusedLAMB variant). Each step:

    - the gradients of all groups are divided in place by c = max(1, ‖g‖/max_grad_norm), ‖g‖ their global L2 norm
      (``max_grad_norm`` of the constructor: one value for every group);
    - per group, t counts its steps; per parameter, with β3 = 1 − β1 (``grad_averaging``) else 1:
      m ← β1·m + β3·g, v ← β2·v + (1 − β2)·g², u = (m / (1 − β1^t)) / (sqrt(v) / sqrt(1 − β2^t) + eps)
      (no bias correction: both divisors 1);
    - weight_decay w ≠ 0: u ← u + w·p; then (w ≠ 0 or ``always_adapt``) u ← u·r, the trust ratio r = ‖p‖/‖u‖
      (1 when either norm is 0; at most 1 with ``trust_clip``);
    - p ← p − lr·u.
    """

    closure_evaluated_first = True  # step() only evaluates a closure before changing the weights, as torch's do

    def __init__(self, params: Union[Iterable[torch.Tensor], Iterable[Dict[str, Any]]], lr: float = 1e-3,
                 bias_correction: bool = True, betas: Tuple[float, float] = (0.9, 0.999), eps: float = 1e-6,
                 weight_decay: float = 0.01, grad_averaging: bool = True, max_grad_norm: float = 1.0,
                 trust_clip: bool = False, always_adapt: bool = False) -> None:
        for name, value in (("lr", lr), ("eps", eps), ("weight_decay", weight_decay), ("max_grad_norm", max_grad_norm)):
            if value < 0.0:
                raise ValueError(f"Lamb: {name} must be >= 0, got {value!r}")
        if not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"Lamb: betas must be in [0, 1), got {betas!r}")
        defaults = dict(lr=lr, bias_correction=bias_correction, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                        grad_averaging=grad_averaging, max_grad_norm=max_grad_norm, trust_clip=trust_clip,
                        always_adapt=always_adapt)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], Any]] = None) -> Any:
        loss = _evaluate(closure)
        grads = [p.grad for group in self.param_groups for p in group["params"] if p.grad is not None]
        if any(g.is_sparse for g in grads):
            raise RuntimeError("Lamb does not support sparse gradients")
        device = self.param_groups[0]["params"][0].device
        global_norm = torch.stack([g.pow(2).sum() for g in grads]).sum().sqrt() if grads else torch.zeros((), device=device)
        max_norm = float(self.defaults["max_grad_norm"])  # SG reads the constructor's value for every group
        clip = torch.where(global_norm > max_norm, global_norm / max_norm, torch.ones_like(global_norm))
        for group in self.param_groups:
            self._update_group(group, clip)
        return loss

    def _update_group(self, group: Dict[str, Any], clip: torch.Tensor) -> None:
        beta1, beta2 = group["betas"]
        beta3 = 1.0 - beta1 if group["grad_averaging"] else 1.0
        group["step"] = group.get("step", 0) + 1  # one count per group, kept in the group as SG keeps it
        step = group["step"]
        correction1 = 1.0 - beta1 ** step if group["bias_correction"] else 1.0
        correction2 = 1.0 - beta2 ** step if group["bias_correction"] else 1.0
        decay = group["weight_decay"]
        for p in group["params"]:
            if p.grad is None:
                continue
            grad = p.grad.div_(clip)  # in place, as SG's Lamb does
            state = self.state[p]
            if not state:
                state["exp_avg"] = torch.zeros_like(p)
                state["exp_avg_sq"] = torch.zeros_like(p)
            exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
            exp_avg.mul_(beta1).add_(grad, alpha=beta3)
            exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
            update = (exp_avg / correction1).div_((exp_avg_sq.sqrt() / math.sqrt(correction2)).add_(group["eps"]))
            if decay != 0:
                update.add_(p, alpha=decay)
            if decay != 0 or group["always_adapt"]:
                weight_norm, update_norm = p.norm(2.0), update.norm(2.0)
                one = torch.ones_like(weight_norm)
                ratio = torch.where((weight_norm > 0) & (update_norm > 0), weight_norm / update_norm, one)
                if group["trust_clip"]:
                    ratio = torch.minimum(ratio, one)
                update.mul_(ratio)
            p.add_(update, alpha=-group["lr"])


#: SuperGradients 3.7's optimizer_params defaults by optimizer class (training/params.py there): used for the
#: keys a recipe does not give. Other optimizers (AdamW, ...) get no defaults, as in SG.
SG_OPTIMIZER_DEFAULTS: Dict[type, Dict[str, Any]] = {
    torch.optim.SGD: {"weight_decay": 1e-4, "momentum": 0.9},
    torch.optim.Adam: {"weight_decay": 1e-4},
    torch.optim.RMSprop: {"weight_decay": 1e-4, "momentum": 0.9},
    RMSpropTF: {"weight_decay": 1e-4, "momentum": 0.9},
}


def sg_optimizer_defaults(optimizer_cls: Any) -> Dict[str, Any]:
    """The defaults SG gives ``optimizer_cls`` (exact class, as SG matches it), or {}."""
    return dict(SG_OPTIMIZER_DEFAULTS.get(optimizer_cls, {}))


def build_optimizer(net: nn.Module, params: TrainingParams) -> torch.optim.Optimizer:
    """The optimizer ``params`` asks for, over ``net``'s parameters; ValueError when the model has no trainable
    parameter, or when an optimizer instance holds parameters ``net`` does not own (it would train nothing)."""
    check_trainable(net)
    if isinstance(params.optimizer, Mapping):  # {Name: {kwargs}}, e.g. {SAM: {base: SGD, rho: 0.05}}
        _optimizer_from_mapping(params)
    spec = params.optimizer
    if isinstance(spec, torch.optim.Optimizer):
        check_owned_parameters(spec, net)
        optimizer = spec
    else:
        factory = spec if isinstance(spec, type) else _registry_get(OPTIMIZERS, spec, "optimizer")
        # SG 3.7's per-optimizer defaults (SGD: momentum 0.9, weight_decay 1e-4, ...) under the given values;
        # written back so training_params.yaml shows what the optimizer really got
        params["optimizer_params"] = {**sg_optimizer_defaults(factory), **dict(params.optimizer_params)}
        warn_unread_sg_keys(net, params)  # multiply_head_lr needs the model's initialize_param_groups
        if callable(getattr(net, "initialize_param_groups", None)):
            groups = model_param_groups(net, params)
            default_lr = float(params.initial_lr)
        else:
            groups = param_groups(net, params.initial_lr, params.zero_weight_decay_on_bias_and_bn,
                                  params.optimizer_params.get("weight_decay", 0.0))
            default_lr = groups[-1]["lr"] if groups else 0.0
        try:
            optimizer = factory(groups, **{"lr": default_lr, **dict(params.optimizer_params)})
        except TypeError as err:
            raise ValueError(f"training_params.optimizer_params: {err}") from None
    for group in optimizer.param_groups:
        group["initial_lr"] = group["lr"]  # lr0 of every schedule
    return optimizer


def check_trainable(net: nn.Module) -> None:
    """ValueError when ``net`` has no parameter with requires_grad: training would change nothing."""
    if not any(p.requires_grad for p in net.parameters()):
        what = "has no parameters" if next(net.parameters(), None) is None else "has only frozen parameters " \
            "(requires_grad=False)"
        raise ValueError(f"model: {type(net).__name__} {what}: there is nothing to train; unfreeze some (e.g. "
                         "p.requires_grad_(True)), or evaluate it with Trainer.test")


def check_owned_parameters(optimizer: torch.optim.Optimizer, net: nn.Module) -> None:
    """ValueError when ``optimizer`` holds parameters that are not ``net``'s (an optimizer built for another
    model, or for a copy of this one): its steps would never change the model being trained."""
    owned = {id(p) for p in net.parameters()}
    held = [p for group in optimizer.param_groups for p in group["params"]]
    foreign = [p for p in held if id(p) not in owned]
    if foreign:
        shapes = ", ".join(str(tuple(p.shape)) for p in foreign[:3]) + (", ..." if len(foreign) > 3 else "")
        raise ValueError(f"training_params.optimizer: {len(foreign)} of the {len(held)} parameters of the "
                         f"{type(optimizer).__name__} instance are not the model's (shapes {shapes}): it was built for "
                         "another model or a copy; build it from this model, e.g. torch.optim.SGD(model.parameters(), "
                         "lr=...), or give the optimizer by name")


def _optimizer_from_mapping(params: TrainingParams) -> None:
    """Rewrite ``optimizer: {Name: {kwargs}}`` as ``optimizer: Name`` with the kwargs under optimizer_params
    (optimizer_params wins on a key given in both), so training_params.yaml shows what was built."""
    name, kwargs = parse_spec(params.optimizer, "optimizer")
    if name == "_target_":
        raise ValueError("training_params.optimizer: give {Name: {params}}, not a _target_ (the trainer passes "
                         "the param groups itself)")
    params["optimizer"], params["optimizer_params"] = name, {**kwargs, **dict(params.optimizer_params)}


def model_param_groups(net: nn.Module, params: TrainingParams) -> List[Dict[str, Any]]:
    """Param groups from the model's SuperGradients-style ``initialize_param_groups(lr, training_params)``: a
    list of dicts with ``named_params`` (or ``params``) and per-group optimizer options. With
    zero_weight_decay_on_bias_and_bn each group is split into a no-decay and a decay group, as SG does."""
    lr = params.initial_lr
    if isinstance(lr, Mapping):
        raise ValueError("training_params.initial_lr: the model defines initialize_param_groups(lr, training_params), "
                         "which takes one lr; give initial_lr as a number")
    given = net.initialize_param_groups(float(lr), params)
    if not isinstance(given, (list, tuple)) or not all(isinstance(g, Mapping) for g in given):
        raise ValueError(f"{type(net).__name__}.initialize_param_groups must return a list of dicts with "
                         f"'named_params' and optimizer options, got {type(given).__name__}")
    no_decay = no_decay_names(net) if params.zero_weight_decay_on_bias_and_bn else set()
    names = {id(p): n for n, p in net.named_parameters()}
    weight_decay = params.optimizer_params.get("weight_decay", 0.0)
    groups: List[Dict[str, Any]] = []
    for group in given:
        options = {k: v for k, v in group.items() if k not in ("named_params", "params")}
        if "named_params" in group:
            members = list(group["named_params"])
        else:
            members = [(names.get(id(p), ""), p) for p in group.get("params", [])]
        if not params.zero_weight_decay_on_bias_and_bn:
            groups.append({**options, "params": [p for _, p in members]})
            continue
        options.pop("weight_decay", None)
        groups.append({**options, "params": [p for n, p in members if n in no_decay], "weight_decay": 0.0})
        groups.append({**options, "params": [p for n, p in members if n not in no_decay], "weight_decay": weight_decay})
    return [g for g in groups if g["params"]]


def _registry_get(registry: Any, name: str, key: str) -> Any:
    try:
        return registry.get(name)
    except ValueError as err:
        raise ValueError(f"training_params.{key}: {err}") from None


def param_groups(net: nn.Module, initial_lr: Any, split_no_decay: bool, weight_decay: float) -> List[Dict[str, Any]]:
    """Param groups for ``initial_lr`` (a number, or {prefix: lr, "default": lr} matched by longest prefix)."""
    lrs = dict(initial_lr) if isinstance(initial_lr, Mapping) else {"default": float(initial_lr)}
    prefixes = sorted((p for p in lrs if p != "default"), key=len, reverse=True)
    members: Dict[str, List[Tuple[str, nn.Parameter]]] = {name: [] for name in lrs}
    unmatched = []
    for pname, param in net.named_parameters():
        prefix = next((p for p in prefixes if pname.startswith(p)), None)
        if prefix is None and "default" not in lrs:
            unmatched.append(pname)
            continue
        members[prefix or "default"].append((pname, param))
    if unmatched:
        raise ValueError(f"training_params.initial_lr: parameters {unmatched[:3]} match no prefix; add a 'default' lr")
    for prefix in prefixes:
        if not members[prefix]:
            names = [n for n, _ in net.named_parameters()][:5]
            raise ValueError(f"training_params.initial_lr: prefix {prefix!r} matches no parameter (names look like {names})")
    no_decay = no_decay_names(net) if split_no_decay else set()
    ordered = [p for p in lrs if p != "default"] + (["default"] if "default" in lrs else [])
    groups: List[Dict[str, Any]] = []
    for name in ordered:
        lr = float(lrs[name])
        if lr == 0.0 and isinstance(initial_lr, Mapping):  # a prefix at lr 0 freezes: no gradients for it
            for _, param in members[name]:
                param.requires_grad_(False)
        decay = [p for n, p in members[name] if n not in no_decay]
        plain = [p for n, p in members[name] if n in no_decay]
        if decay or not plain:
            groups.append({"params": decay, "lr": lr, "name": name})
        if plain:
            groups.append({"params": plain, "lr": lr, "name": f"{name}_no_decay", "weight_decay": 0.0})
    return [g for g in groups if g["params"]] or groups[:1]


def no_decay_names(net: nn.Module) -> set:
    """Biases and the weights of normalization layers: weight decay only shrinks them needlessly."""
    norm_types = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, nn.LocalResponseNorm)
    names = set()
    for mname, module in net.named_modules():
        for pname, _ in module.named_parameters(recurse=False):
            full = f"{mname}.{pname}" if mname else pname
            if pname == "bias" or isinstance(module, norm_types):
                names.add(full)
    return names


def step_takes_closure(optimizer: torch.optim.Optimizer) -> bool:
    """True for optimizers whose step() uses a closure beyond evaluating it first (LBFGS, SAM, third-party
    optimizers with a ``closure`` parameter). torch's other optimizers only evaluate it before changing the
    weights, so they step without one and pay nothing; so do optimizers that say so with a class attribute
    ``closure_evaluated_first = True`` (RMSpropTF, Lamb: with fp16 they step through the GradScaler)."""
    if isinstance(optimizer, torch.optim.LBFGS):
        return True
    if type(optimizer).__module__.startswith("torch.optim") or getattr(optimizer, "closure_evaluated_first", False):
        return False
    try:
        return "closure" in inspect.signature(optimizer.step).parameters
    except (TypeError, ValueError):
        return False

