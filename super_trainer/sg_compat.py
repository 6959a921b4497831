"""SuperGradients recipes verbatim (SPEC §8): what an SG 3.7 recipe names that only SG would provide.

- ``_target_`` paths into ``super_gradients``: when SuperGradients is not installed, each resolves to its
  equivalent here (``SG_TARGETS``, or an object of the same name in one of super_trainer's registries); a path
  with no equivalent raises one ValueError naming it. With SuperGradients installed, Hydra imports them as usual.
- SG's OmegaConf resolvers (``hydra_output_dir``, ``add``, ``mul``, ...) and the ``variable_setup.yaml`` shortcuts
  (``lr``, ``batch_size``, ``epochs``, ...) that SG's ``RecipeShortcutsCallback`` copies into the recipe.

docs/migrating_from_supergradients.md has the table of equivalents.
"""
from __future__ import annotations

import functools
import importlib.util
import operator
import warnings
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple

from omegaconf import DictConfig, OmegaConf, open_dict

from .registry import (CALLBACKS, DATASETS, LOSSES, METRICS, MODELS, OPTIMIZERS, Registry, add_target_resolver,
                       instantiate, instantiate_nested)

__all__ = ["sg_installed", "SG_TARGETS", "resolve_sg_target", "instantiate", "instantiate_nested",
           "register_resolvers", "apply_recipe_shortcuts", "RecipeShortcutsCallback", "hydra_callback_overrides",
           "DEFAULT_CKPT_ROOT", "ckpt_root"]

SG = "super_gradients."
DEFAULT_CKPT_ROOT = "checkpoints"


@functools.lru_cache(maxsize=None)
def sg_installed() -> bool:
    """Whether SuperGradients can be imported (then its ``_target_`` paths are left to Hydra)."""
    return importlib.util.find_spec("super_gradients") is not None


def _empty_list() -> List[Any]:
    return []


def _phase() -> Any:
    from .callbacks.base import Phase

    return Phase


def _shortcuts_callback() -> Any:
    return RecipeShortcutsCallback


#: SG paths with a fixed equivalent (the object is looked up when first needed).
SG_TARGETS: Dict[str, Callable[[], Any]] = {
    "super_gradients.training.utils.utils.empty_list": lambda: _empty_list,
    "super_gradients.training.utils.callbacks.callbacks.Phase": _phase,
    "super_gradients.training.utils.callbacks.base_callbacks.Phase": _phase,
    "super_gradients.training.utils.callbacks.Phase": _phase,
    "super_gradients.common.environment.omegaconf_utils.RecipeShortcutsCallback": _shortcuts_callback,
}

#: Where an SG path points, by module prefix: the registry searched first for the object's name (then all others).
_SG_KINDS: Tuple[Tuple[str, Registry, str], ...] = (
    ("super_gradients.training.losses", LOSSES, "register_loss"),
    ("super_gradients.training.metrics", METRICS, "register_metric"),
    ("super_gradients.training.utils.callbacks", CALLBACKS, "register_callback"),
    ("super_gradients.training.utils.optimizers", OPTIMIZERS, "register_optimizer"),
    ("super_gradients.training.models", MODELS, "register_model"),
    ("super_gradients.training.datasets", DATASETS, "register_dataset"),
    ("super_gradients.training.dataloaders", DATASETS, "register_dataset"),
)
_ALL = ((LOSSES, "register_loss"), (METRICS, "register_metric"), (CALLBACKS, "register_callback"),
        (OPTIMIZERS, "register_optimizer"), (MODELS, "register_model"), (DATASETS, "register_dataset"))


def resolve_sg_target(path: str) -> Any:
    """The object here that stands for SG's ``path``: ``SG_TARGETS``, else the object registered under the path's last
    name (the registry its module suggests first, with its torch fallbacks; then every registry's own entries).
    ValueError naming the path when there is none."""
    if path in SG_TARGETS:
        return SG_TARGETS[path]()
    name = path.rsplit(".", 1)[-1]
    hinted = next(((reg, how) for prefix, reg, how in _SG_KINDS if path.startswith(prefix + ".")), None)
    if hinted is not None:
        found = hinted[0].lookup_exact(name, fallbacks=True)
        if found is not None:
            return found
    for registry, _ in _ALL:
        found = registry.lookup_exact(name, fallbacks=False)
        if found is not None:
            return found
    how = hinted[1] if hinted else "register_callback"
    raise ValueError(f"_target_ {path!r}: SuperGradients is not installed and super_trainer has no equivalent named "
                     f"{name!r}; register one (e.g. @super_trainer.registry.{how}({name!r})) or install super-gradients "
                     "(docs/migrating_from_supergradients.md lists the equivalents)")


def as_named_spec(spec: Any, registry: Registry) -> Any:
    """``{_target_: super_gradients...Name, **params}`` as ``{Name: params}`` when ``registry`` holds ``Name`` (so the
    builder's SG translations apply, e.g. SG's CrossEntropyLoss ``smooth_eps``); anything else unchanged."""
    target = spec.get("_target_") if isinstance(spec, Mapping) else None
    if not (isinstance(target, str) and target.startswith(SG)) or sg_installed() or target in SG_TARGETS:
        return spec
    name = target.rsplit(".", 1)[-1]
    if registry.lookup_exact(name) is None:
        return spec
    return {name: {k: v for k, v in spec.items() if k not in ("_target_", "_convert_", "_recursive_")}}


def _resolve_sg_path(path: str) -> Any:
    """The registry's resolver for ``super_gradients.`` targets: ours when SuperGradients is absent, else None (Hydra
    imports SG's own)."""
    return None if sg_installed() else resolve_sg_target(path)


add_target_resolver(SG, _resolve_sg_path)


# ---- resolvers ------------------------------------------------------------------------------------------------

def ckpt_root(value: Any) -> str:
    """``ckpt_root_dir`` as SG reads it: null (SG's ``variable_setup`` sets it so) means the default root."""
    return DEFAULT_CKPT_ROOT if value is None or str(value) in ("", "None", "null") else str(value)


def _hydra_output_dir(ckpt_root_dir: Any, experiment_name: Any) -> str:
    return f"{ckpt_root(ckpt_root_dir)}/{experiment_name}"


_RESOLVERS: Dict[str, Callable[..., Any]] = {
    "hydra_output_dir": _hydra_output_dir,
    "add": lambda *args: sum(args),
    "div": lambda x, y: x / y,
    "mul": lambda *args: functools.reduce(operator.mul, args[1:], args[0]),
    "cond": lambda boolean, x, y: x if boolean else y,
    "getitem": lambda container, key: container[key],
    "first": lambda items: items[0],
    "last": lambda items: items[-1],
    "len": lambda items: len(items),
}


def register_resolvers() -> None:
    """Register SG's recipe resolvers (``${hydra_output_dir:...}``, ``${add:...}``, ...) unless a resolver of that name
    exists already (SuperGradients' own, when it is installed and imported)."""
    for name, resolver in _RESOLVERS.items():
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, resolver)


# ---- variable_setup.yaml shortcuts ----------------------------------------------------------------------------

#: SG's shortcut keys and the recipe keys each stands for (SG's RecipeShortcutsCallback).
SHORTCUTS: Tuple[Tuple[str, Tuple[str, ...]], ...] = (
    ("lr", ("training_hyperparams.initial_lr",)),
    ("batch_size", ("dataset_params.train_dataloader_params.batch_size",)),
    ("val_batch_size", ("dataset_params.val_dataloader_params.batch_size",)),
    ("resume", ("training_hyperparams.resume",)),
    ("epochs", ("training_hyperparams.max_epochs",)),
    ("ema", ("training_hyperparams.ema",)),
    ("num_workers", ("dataset_params.train_dataloader_params.num_workers",
                     "dataset_params.val_dataloader_params.num_workers")),
)


def apply_recipe_shortcuts(cfg: DictConfig) -> None:
    """What SG's ``RecipeShortcutsCallback`` does: a shortcut that is set (``lr=0.01``) overrides the key it stands for;
    an unset one shows that key's value. A shortcut the recipe does not have, or whose key it lacks, is left alone.
    Applying it twice changes nothing."""
    with open_dict(cfg):
        for shortcut, keys in SHORTCUTS:
            if shortcut not in cfg:
                continue
            for key in keys:
                if OmegaConf.select(cfg, key, default=_MISSING) is _MISSING:
                    continue
                value = cfg[shortcut] if cfg[shortcut] is not None else OmegaConf.select(cfg, key)
                cfg[shortcut] = value
                OmegaConf.update(cfg, key, value, force_add=True)


_MISSING = object()

try:  # Hydra's experimental callback API: present in hydra-core 1.1+
    from hydra.experimental.callback import Callback as _HydraCallback
except ImportError:  # pragma: no cover
    _HydraCallback = object  # type: ignore[misc,assignment]


class RecipeShortcutsCallback(_HydraCallback):  # type: ignore[misc,valid-type]
    """The Hydra callback SG's ``variable_setup.yaml`` names, for the CLI: applies the shortcuts at run start (the CLI
    applies them again to each job of a sweep, which SG does not)."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        apply_recipe_shortcuts(config)


def hydra_callbacks_in(hydra_node: Any) -> Dict[str, str]:
    """``{name: _target_}`` of the Hydra callbacks in a recipe's ``hydra`` node (``cfg.hydra``, ``HydraConfig.get()``)."""
    callbacks = (hydra_node.get("callbacks") if hydra_node is not None else None) or {}
    return {str(name): str(node.get("_target_")) for name, node in callbacks.items() if isinstance(node, Mapping)}


def uses_shortcuts(callbacks: Mapping[str, str]) -> bool:
    shortcut_paths = {path for path, get in SG_TARGETS.items() if get is _shortcuts_callback}
    ours = f"{__name__}.RecipeShortcutsCallback"
    return any(target in shortcut_paths or target == ours for target in callbacks.values())


def hydra_callback_overrides(compose: Callable[[], Optional[DictConfig]]) -> List[str]:
    """Overrides that point a recipe's Hydra callbacks into super_gradients at their equivalents here, for the CLI
    (Hydra instantiates them before any of our code runs). ``compose()`` gives the recipe with its ``hydra`` node, or
    None when it cannot be composed (Hydra then reports why). ValueError for a callback with no equivalent."""
    if sg_installed():
        return []
    cfg = compose()
    if cfg is None:
        return []
    overrides = []
    for name, target in hydra_callbacks_in(cfg.get("hydra")).items():
        if target.startswith(SG):
            equivalent = resolve_sg_target(target)
            overrides.append(f"hydra.callbacks.{name}._target_={equivalent.__module__}.{equivalent.__qualname__}")
    return overrides


def warn_python_path_callbacks(callbacks: Mapping[str, str]) -> None:
    """A recipe's Hydra callbacks run only in a Hydra app (the CLI); ``load_recipe`` applies SG's shortcuts itself."""
    others = [name for name, target in callbacks.items() if not uses_shortcuts({name: target})]
    if others:
        warnings.warn(f"recipe hydra.callbacks {others} run only under the super-trainer CLI (a Hydra app), not "
                      "through load_recipe / Trainer.train", stacklevel=3)


def warn_unread_sg_keys(net: Any, params: Mapping[str, Any]) -> None:
    """``multiply_head_lr`` is read by a model's ``initialize_param_groups`` / ``update_param_groups`` (SG's segmentation
    models); with a model that has neither, nothing reads it: one warning, the run goes on as SG's would."""
    value = params.get("multiply_head_lr")
    if value is None or value == 1:
        return
    if not any(callable(getattr(net, hook, None)) for hook in ("initialize_param_groups", "update_param_groups")):
        warnings.warn(f"training_params.multiply_head_lr={value} has no effect: {type(net).__name__} defines no "
                      "initialize_param_groups / update_param_groups, where SuperGradients' models read it", stacklevel=4)
