"""Name → object registries used to build models, losses, metrics, optimizers, callbacks and datasets.

Objects are looked up by exact name, then case-insensitively, then in the registry's fallback namespaces
(e.g. every ``torch.nn`` loss, every ``torch.optim`` optimizer, every torchmetrics metric). An unknown name
raises ``ValueError`` naming the close matches.
"""
from __future__ import annotations

import difflib
import functools
import inspect
from types import ModuleType
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Tuple

__all__ = ["to_plain", "Registry", "MODELS", "LOSSES", "METRICS", "OPTIMIZERS", "CALLBACKS", "DATASETS", "close_matches",
           "register_model", "register_loss", "register_metric", "register_callback", "register_optimizer",
           "register_dataset", "instantiate", "instantiate_nested", "add_target_resolver"]


def close_matches(word: str, candidates: Iterable[str], n: int = 3) -> List[str]:
    """Candidates that look like ``word`` (case-insensitive), best first."""
    by_lower: Dict[str, str] = {}
    for candidate in candidates:
        by_lower.setdefault(candidate.lower(), candidate)
    found = difflib.get_close_matches(word.lower(), list(by_lower), n=n, cutoff=0.5)
    return [by_lower[f] for f in found]


class Registry:
    """A named collection of factories (classes or functions).

    ``fallbacks`` are ``(module, predicate)`` pairs searched for names not registered here, so that e.g.
    every torch.nn loss class is available without listing it.
    """

    def __init__(self, kind: str, fallbacks: Tuple[Tuple[ModuleType, Callable[[Any], bool]], ...] = ()) -> None:
        self.kind = kind
        self._entries: Dict[str, Any] = {}
        self._fallbacks = fallbacks

    def register(self, name_or_obj: Any = None) -> Any:
        """Register a factory; usable as ``@REG.register``, ``@REG.register("Name")`` or ``REG.register(obj)``."""
        if name_or_obj is None or isinstance(name_or_obj, str):
            name = name_or_obj

            def decorator(obj: Any) -> Any:
                self._entries[name or obj.__name__] = obj
                return obj

            return decorator
        self._entries[name_or_obj.__name__] = name_or_obj
        return name_or_obj

    def register_sg(self, name: Any = None, deprecated_name: Optional[str] = None) -> Any:
        """SuperGradients' registration: ``@register_x()``, ``@register_x("Name")``, ``@register_x(name="Name",
        deprecated_name="old")`` (and ``@register_x`` without parentheses). As in SG, a name already registered to a
        different object raises; registering the same class again (a re-run notebook cell redefines it) replaces it."""
        if name is not None and not isinstance(name, str):  # used without parentheses
            return self.register_sg()(name)

        def decorator(obj: Any) -> Any:
            for key in [name or obj.__name__] + ([deprecated_name] if deprecated_name else []):
                current = self._entries.get(key)
                if current is not None and current is not obj and _qualified(current) != _qualified(obj):
                    raise ValueError(f"{self.kind} {key!r} is already registered to {_qualified(current)}; "
                                     f"cannot register {_qualified(obj)} under that name")
                self._entries[key] = obj
            return obj

        return decorator

    def lookup_exact(self, name: str, fallbacks: bool = True) -> Optional[Any]:
        """The object registered under exactly ``name`` (no case folding, no close matches), else None; with
        ``fallbacks`` also the fallback namespaces (torch losses, optimizers, torchmetrics)."""
        if name in self._entries:
            return self._entries[name]
        if fallbacks:
            for module, accept in self._fallbacks:
                obj = getattr(module, name, None)
                if obj is not None and accept(obj):
                    return obj
        return None

    def names(self) -> List[str]:
        """All names this registry resolves, registered ones first."""
        names = list(self._entries)
        for module, accept in self._fallbacks:
            names.extend(n for n, obj in vars(module).items() if not n.startswith("_") and accept(obj))
        return list(dict.fromkeys(names))

    def get(self, name: str) -> Any:
        """The factory registered under ``name``; ValueError with close matches when unknown."""
        if name in self._entries:
            return self._entries[name]
        for module, accept in self._fallbacks:
            obj = getattr(module, name, None)
            if obj is not None and accept(obj):
                return obj
        lowered = name.lower()
        for candidate in self.names():
            if candidate.lower() == lowered:
                return self.get(candidate)
        hint = close_matches(name, self.names())
        suggestion = f"; did you mean {' or '.join(repr(h) for h in hint)}?" if hint else ""
        if not self._fallbacks:  # a short list (models, datasets, callbacks): name every valid choice
            suggestion += f" (valid: {', '.join(sorted(self._entries))})"
        raise ValueError(f"unknown {self.kind} {name!r}{suggestion}")

    def __contains__(self, name: str) -> bool:
        try:
            self.get(name)
        except ValueError:
            return False
        return True

    def build(self, spec: Any, **defaults: Any) -> Any:
        """Build an object from ``"Name"``, ``{"Name": {params}}`` or a Hydra ``{"_target_": ...}`` mapping.

        Anything else (an already-built object) is returned as is.
        """
        name, params = parse_spec(spec, self.kind)
        if name is None:
            return spec
        if name == "_target_":
            return instantiate(params)
        factory = self.get(name)
        return factory(**instantiate_nested({**defaults, **params}))


def parse_spec(spec: Any, kind: str) -> Tuple[Optional[str], Dict[str, Any]]:
    """Split a build spec into (name, params); (None, {}) for an object that is already built."""
    if isinstance(spec, str):
        return spec, {}
    if isinstance(spec, Mapping):
        spec = dict(to_plain(spec))
        if "_target_" in spec:
            return "_target_", spec
        if len(spec) != 1:
            raise ValueError(
                f"a {kind} given as a mapping must have exactly one key, its name ({{Name: {{params}}}}), "
                f"or a _target_; got keys {list(spec)}"
            )
        (name, params), = spec.items()
        if params is None:
            params = {}
        if not isinstance(params, Mapping):
            raise ValueError(f"the params of {kind} {name!r} must be a mapping, got {params!r}")
        return str(name), dict(params)
    return None, {}


def _qualified(obj: Any) -> str:
    return f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', type(obj).__name__)}"


def to_plain(value: Any) -> Any:
    """A DictConfig/ListConfig as plain dicts and lists (interpolations resolved), so factories and
    validation see ordinary Python values; anything else unchanged."""
    from omegaconf import DictConfig, ListConfig, OmegaConf

    if isinstance(value, (DictConfig, ListConfig)):
        return OmegaConf.to_container(value, resolve=True)
    return value


def _is_loss_class(obj: Any) -> bool:
    import torch.nn as nn

    return inspect.isclass(obj) and issubclass(obj, nn.Module) and obj.__name__.endswith("Loss")


def _is_optimizer_class(obj: Any) -> bool:
    import torch.optim as optim

    return inspect.isclass(obj) and issubclass(obj, optim.Optimizer) and obj is not optim.Optimizer


def _is_metric_class(obj: Any) -> bool:
    from torchmetrics import Metric

    return inspect.isclass(obj) and issubclass(obj, Metric) and obj is not Metric


def _fallbacks_losses() -> Tuple[Tuple[ModuleType, Callable[[Any], bool]], ...]:
    import torch.nn as nn

    return ((nn, _is_loss_class),)


def _fallbacks_optimizers() -> Tuple[Tuple[ModuleType, Callable[[Any], bool]], ...]:
    import torch.optim as optim

    return ((optim, _is_optimizer_class),)


def _fallbacks_metrics() -> Tuple[Tuple[ModuleType, Callable[[Any], bool]], ...]:
    import torchmetrics

    return ((torchmetrics, _is_metric_class),)


MODELS = Registry("model")
LOSSES = Registry("loss", _fallbacks_losses())
METRICS = Registry("metric", _fallbacks_metrics())
OPTIMIZERS = Registry("optimizer", _fallbacks_optimizers())
CALLBACKS = Registry("callback")
DATASETS = Registry("dataset")


# SuperGradients' registry decorators (``super_gradients.common.registry``), same call forms:
# ``@register_model()``, ``@register_model("Name")``, ``@register_model(name="Name", deprecated_name="old")``.
register_model = MODELS.register_sg
register_loss = LOSSES.register_sg
register_metric = METRICS.register_sg
register_callback = CALLBACKS.register_sg
register_optimizer = OPTIMIZERS.register_sg
register_dataset = DATASETS.register_sg


# ---- _target_ nodes ----------------------------------------------------------------------------------------

_HYDRA_FLAGS = ("_target_", "_args_", "_partial_", "_recursive_", "_convert_")
#: (path prefix, resolver): a resolver returns the object a ``_target_`` path stands for, or None to import it.
_TARGET_RESOLVERS: List[Tuple[str, Callable[[str], Any]]] = []


def add_target_resolver(prefix: str, resolve: Callable[[str], Any]) -> None:
    """Let ``resolve(path)`` stand in for the import of ``_target_`` paths starting with ``prefix`` (sg_compat uses
    it for ``super_gradients.`` paths when SuperGradients is not installed)."""
    _TARGET_RESOLVERS.append((prefix, resolve))


def _factory(target: Any) -> Any:
    """The callable a ``_target_`` names: a registered resolver's answer, else the imported object."""
    if callable(target):
        return target
    path = str(target)
    for prefix, resolve in _TARGET_RESOLVERS:
        if path.startswith(prefix):
            found = resolve(path)
            if found is not None:
                return found
    from hydra.utils import get_object

    try:
        return get_object(path)
    except Exception as err:  # ImportError, AttributeError, ...: one line naming the path
        raise ValueError(f"_target_ {path!r}: cannot import it ({str(err).splitlines()[0]})") from None


def instantiate(node: Any) -> Any:
    """Build every ``_target_`` node in ``node``, as ``hydra.utils.instantiate`` does (``_args_``, ``_partial_``,
    ``_recursive_``; containers always come out as plain dicts and lists, SG recipes' ``_convert_: all``), with
    registered resolvers (SG paths) applied. Done here rather than by Hydra, which re-imports a ``_target_`` by its
    dotted name and so cannot call an object registered from a notebook cell or a function."""
    node = to_plain(node)
    if isinstance(node, (list, tuple)):
        return [instantiate(v) for v in node]
    if not isinstance(node, Mapping):
        return node
    if "_target_" not in node:
        return {k: instantiate(v) for k, v in node.items()}
    factory = _factory(node["_target_"])
    recursive = node.get("_recursive_", True)
    args = [instantiate(a) if recursive else a for a in node.get("_args_", [])]
    kwargs = {k: instantiate(v) if recursive else v for k, v in node.items() if k not in _HYDRA_FLAGS}
    if node.get("_partial_"):
        return functools.partial(factory, *args, **kwargs)
    return factory(*args, **kwargs)


def _has_target(node: Any) -> bool:
    if isinstance(node, Mapping):
        return "_target_" in node or any(_has_target(v) for v in node.values())
    if isinstance(node, (list, tuple)):
        return any(_has_target(v) for v in node)
    return False


def instantiate_nested(params: Dict[str, Any]) -> Dict[str, Any]:
    """``params`` with each ``_target_`` node inside it built, as SG builds a whole recipe before using it (e.g.
    EarlyStop's ``phase: {_target_: ...Phase, value: VALIDATION_EPOCH_END}``); unchanged when there is none."""
    if not _has_target(params):
        return params
    return {k: instantiate(v) if _has_target(v) else v for k, v in params.items()}
