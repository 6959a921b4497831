"""Recipes: Hydra/OmegaConf YAML that names everything a training run needs (SPEC §5).

A recipe's top-level keys: ``experiment_name``, ``ckpt_root_dir``, ``device``, ``architecture``,
``custom_imports``, and the groups ``training_hyperparams``, ``dataset_params``, ``arch_params``,
``checkpoint_params``. Objects are built through the registries (``{Name: {params}}`` or a Hydra
``_target_`` mapping). The resolved recipe is saved as ``recipe.yaml`` in the run dir.
"""
from __future__ import annotations

import importlib
import importlib.util
import logging
import os
import sys
import warnings
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
from omegaconf import DictConfig, OmegaConf, open_dict
from omegaconf.errors import OmegaConfBaseException
from torch.utils.data import DataLoader, DistributedSampler, IterableDataset

from . import distributed, sg_compat
from .batches import call_model, metric_preds
from .building import RunInputs, resolve_device
from .losses import build_criterion
from .files import atomic_write_text
from .rng import preserved_rng, seed_everything
from .sharding import UnpaddedDistributedSampler, shared_seed
from .checkpoint import load_checkpoint_to_model
from .metrics import build_metrics
from .params import resolve_training_params
from .steps import build_batch_reader, resolve_train_step
from .registry import DATASETS, MODELS, close_matches, parse_spec, to_plain

__all__ = ["recipes_dir", "recipe_names", "load_recipe", "build_from_recipe", "check_model_fits_data", "run_inputs",
           "recipe_experiment_dir", "RECIPE_FILE", "HYDRA_DIR"]

RECIPE_FILE = "recipe.yaml"
HYDRA_DIR = ".hydra"
RecipeLike = Union[str, Path, DictConfig, Mapping[str, Any]]


def recipes_dir() -> Path:
    """The recipes shipped with the package: ``recipes/`` beside it in a source/editable install, the
    ``super_trainer_recipes`` package in a wheel install."""
    source = Path(__file__).resolve().parent.parent / "recipes"
    if (source / "base.yaml").is_file():
        return source
    spec = importlib.util.find_spec("super_trainer_recipes")  # a data-only (namespace) package
    if spec is None or not spec.submodule_search_locations:  # pragma: no cover - a broken install
        raise FileNotFoundError("the super_trainer recipes are not installed (no recipes/ beside the package)")
    return Path(list(spec.submodule_search_locations)[0]).resolve()


def recipe_names(directory: Optional[Path] = None) -> List[str]:
    directory = directory or recipes_dir()
    return sorted(p.stem for p in directory.glob("*.yaml") if p.stem != "base")


def load_recipe(recipe: RecipeLike, overrides: Sequence[str] = ()) -> DictConfig:
    """Compose a recipe given by name (under recipes/), by YAML path, or as a (Dict)Config, with Hydra
    overrides like ``"training_hyperparams.max_epochs=3"``."""
    if isinstance(recipe, DictConfig) or isinstance(recipe, Mapping):
        cfg = recipe if isinstance(recipe, DictConfig) else OmegaConf.create(dict(recipe))
        if overrides:
            cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(list(overrides)))
        return cfg
    path = Path(str(recipe))
    if path.suffix in (".yaml", ".yml") or path.is_file():
        if not path.is_file():
            raise FileNotFoundError(f"recipe file not found: {path}")
        return _compose(path.resolve().parent, path.stem, overrides)
    name = str(recipe)
    if not (recipes_dir() / f"{name}.yaml").is_file():
        hint = close_matches(name, recipe_names())
        raise ValueError(f"unknown recipe {name!r}" + (f"; did you mean {' or '.join(map(repr, hint))}?" if hint
                                                       else f"; recipes: {recipe_names()}"))
    return _compose(recipes_dir(), name, overrides)


def _compose(directory: Path, name: str, overrides: Sequence[str], hydra_node: bool = False) -> DictConfig:
    """Compose ``name`` from ``directory`` (searched first) and the shipped recipes. SG's resolvers are registered, and
    SG's ``variable_setup`` shortcuts (``lr=...``, ``epochs=...``) applied, as its Hydra callback would in a Hydra app.
    ``hydra_node`` keeps the ``hydra`` node (the CLI reads the recipe's Hydra callbacks from it)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    sg_compat.register_resolvers()
    extra = []
    if directory.resolve() != recipes_dir().resolve():
        # let a user's recipe use the shipped groups and base (e.g. `- base`, `training_hyperparams: ...`)
        extra.append(f"hydra.searchpath=[file://{recipes_dir()}]")
    was_initialized = GlobalHydra.instance().is_initialized()
    if was_initialized:  # e.g. called from inside a Hydra app: compose in a fresh context
        saved = GlobalHydra.instance().hydra
        GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(directory), version_base="1.3"):
            cfg = compose(config_name=name, overrides=list(overrides) + extra, return_hydra_config=True)
    finally:
        if was_initialized:
            GlobalHydra.instance().initialize(saved)
    if hydra_node:
        return cfg
    callbacks = sg_compat.hydra_callbacks_in(cfg.get("hydra"))
    with open_dict(cfg):
        del cfg["hydra"]
    if sg_compat.uses_shortcuts(callbacks):
        sg_compat.apply_recipe_shortcuts(cfg)
    sg_compat.warn_python_path_callbacks(callbacks)
    return cfg


def import_custom_modules(modules: Sequence[str]) -> None:
    """Import the recipe's ``custom_imports`` (module names) so their registrations run. The working
    directory is importable, as it is for ``python script.py`` (the console script alone would not add it)."""
    if modules and os.getcwd() not in sys.path:
        sys.path.append(os.getcwd())
    for module in modules or []:
        try:
            importlib.import_module(str(module))
        except ImportError as err:
            raise ValueError(f"recipe custom_imports: cannot import {module!r}: {err}") from None


def build_model(cfg: DictConfig) -> nn.Module:
    """``architecture`` (a registry name or a ``_target_`` mapping) built with ``arch_params``."""
    architecture = cfg.get("architecture")
    arch_params = to_plain(cfg.get("arch_params")) or {}
    if architecture is None:
        raise ValueError("recipe: 'architecture' is required (a model name such as 'MLP', or a _target_ mapping)")
    spec = to_plain(architecture)
    try:
        name, params = (spec, {}) if isinstance(spec, str) else parse_spec(spec, "model")
        if name != "_target_":
            MODELS.get(name)  # an unknown name is an architecture error; the model's own errors are arch_params'
    except ValueError as err:
        raise ValueError(f"recipe architecture: {err}") from None
    try:
        model = MODELS.build(spec if name == "_target_" else {name: {**arch_params, **params}})
    except (TypeError, ValueError) as err:
        raise ValueError(f"recipe arch_params: {err}") from None
    checkpoint_params = to_plain(cfg.get("checkpoint_params")) or {}
    if checkpoint_params.get("checkpoint_path"):
        load_checkpoint_to_model(model, checkpoint_params["checkpoint_path"],
                                 strict=checkpoint_params.get("strict_load", True),
                                 load_ema_as_net=checkpoint_params.get("load_ema_as_net", False))
    return model


def _dataset(spec: Any, key: str) -> Any:
    try:
        return DATASETS.build(spec)
    except ValueError as err:
        raise ValueError(f"recipe dataset_params.{key}: {err}") from None
    except TypeError as err:
        raise ValueError(f"recipe dataset_params.{key}: {err}") from None


def _loader(dataset: Any, params: Dict[str, Any], train: bool, key: str, seed: Optional[int] = None) -> DataLoader:
    """Under torchrun each rank reads its own share: training through a DistributedSampler shuffled by the
    recipe's seed (the trainer calls its set_epoch), evaluation through disjoint unpadded shares (no sample
    counted twice)."""
    params = dict(params)
    batch_size = params.get("batch_size", 1)
    if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1):
        raise ValueError(f"recipe dataset_params.{key}.batch_size: must be an int >= 1, got {batch_size!r}")
    try:
        if distributed.is_distributed() and train:
            sampler = DistributedSampler(dataset, shuffle=params.pop("shuffle", False), seed=shared_seed(seed),
                                         drop_last=params.get("drop_last", False))
            return DataLoader(dataset, sampler=sampler, **params)
        if distributed.is_distributed():
            params.pop("shuffle", None)
            return DataLoader(dataset, sampler=UnpaddedDistributedSampler(dataset), **params)
        return DataLoader(dataset, **params)
    except (TypeError, ValueError) as err:
        raise ValueError(f"recipe dataset_params.{key}: {err}") from None


def build_loaders(cfg: DictConfig, seed: Optional[int] = None
                  ) -> Tuple[DataLoader, Optional[DataLoader], Dict[str, DataLoader]]:
    """(train, valid, {name: test}) loaders from ``dataset_params``; ``seed`` shuffles the train shares."""
    data = to_plain(cfg.get("dataset_params")) or {}
    if "train_dataset" not in data:
        raise ValueError("recipe dataset_params.train_dataset is required ({Name: {params}} or a _target_ mapping)")
    train_params = data.get("train_dataloader_params") or {}
    eval_params = data.get("val_dataloader_params") or {k: v for k, v in train_params.items() if k != "shuffle"}
    eval_key = "val_dataloader_params" if data.get("val_dataloader_params") else "train_dataloader_params"
    train = _loader(_dataset(data["train_dataset"], "train_dataset"), train_params, True, "train_dataloader_params",
                    seed)
    valid = None
    if data.get("valid_dataset"):
        valid = _loader(_dataset(data["valid_dataset"], "valid_dataset"), eval_params, False, eval_key)
    tests = {str(name): _loader(_dataset(spec, f"test_datasets.{name}"), eval_params, False, eval_key)
             for name, spec in (data.get("test_datasets") or {}).items()}
    return train, valid, tests


def build_from_recipe(cfg: DictConfig) -> Dict[str, Any]:
    """Everything ``Trainer.train`` needs, built from a composed recipe. The training params are validated
    first, and the seed is set before the model and the data are built, so a seeded recipe gives the same
    weights, splits and batch order on every run; a model that cannot take the data, or a loss or metric
    that cannot take the model's output (``Top5`` of 3 classes), raises ValueError here, before any file is
    written and any batch is trained."""
    import_custom_modules(to_plain(cfg.get("custom_imports")) or [])
    if "training_hyperparams" not in cfg:
        raise ValueError("recipe: 'training_hyperparams' is required")
    try:
        params = OmegaConf.to_container(cfg.training_hyperparams, resolve=True)
    except OmegaConfBaseException as err:  # e.g. max_epochs: ??? left unset
        raise ValueError(f"recipe training_hyperparams: {str(err).splitlines()[0]}") from None
    with warnings.catch_warnings():  # sg-recipes: the trainer resolves them again and warns once, there
        warnings.simplefilter("ignore")
        resolved = resolve_training_params(params)
    if resolved.seed is not None:
        seed_everything(resolved.seed)
    model = build_model(cfg)
    train, valid, tests = build_loaders(cfg, resolved.seed)
    check_model_fits_data(model, valid if valid is not None else train, resolved, _recipe_device(cfg))
    return {"model": model, "training_params": params, "train_loader": train, "valid_loader": valid,
            "test_loaders": tests}


def check_model_fits_data(model: nn.Module, loader: Any, training_params: Mapping[str, Any],
                          device: torch.device) -> None:
    """Run ``model`` on two samples of ``loader``'s dataset (eval mode, no gradients), then the loss and every
    metric of ``training_params`` on its output; ValueError naming what does not fit. The global RNG state is
    restored afterwards, so the check changes no number of the run. Skipped for datasets without len()."""
    dataset = getattr(loader, "dataset", None)
    if isinstance(dataset, IterableDataset) or not hasattr(dataset, "__len__") or not hasattr(dataset, "__getitem__"):
        return
    if len(dataset) == 0:
        raise ValueError("recipe dataset_params: the data set is empty")
    with preserved_rng():
        batch = loader.collate_fn([dataset[i] for i in range(min(2, len(dataset)))])
        inputs, target, _ = build_batch_reader(training_params, device)(batch)  # the trainer's batch rules
        if resolve_train_step(training_params, model) is not None:
            return  # a train_step decides what the model is called on; the batch splits, which is all we can check
        model.to(device)
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                preds = call_model(model, inputs)
        except Exception as err:
            shape = tuple(inputs.shape) if isinstance(inputs, torch.Tensor) else type(inputs).__name__
            raise ValueError(f"recipe: the model ({type(model).__name__}) cannot take the data's inputs {shape}: "
                             f"{_first_line(err)}") from None
        finally:
            model.train(was_training)
        _check_output(preds, target, training_params, device)


def _check_output(preds: Any, target: Any, training_params: Mapping[str, Any], device: torch.device) -> None:
    shape = tuple(preds.shape) if isinstance(preds, torch.Tensor) else type(preds).__name__
    criterion = build_criterion(training_params, device)
    try:
        criterion(preds, target)
    except Exception as err:
        raise ValueError(f"training_params.loss: cannot be computed on the model's output {shape} and the "
                         f"data's target: {_first_line(err)}") from None
    for key in ("train_metrics_list", "valid_metrics_list", "test_metrics_list"):
        for title, metric in build_metrics(training_params.get(key), f"training_params.{key}").items():
            try:
                metric.to(device).update(metric_preds(preds), target)
            except Exception as err:
                raise ValueError(f"training_params.{key}: {title} cannot be computed on the model's output {shape}: "
                                 f"{_first_line(err)}") from None


def _first_line(err: BaseException) -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return lines[0] if lines else type(err).__name__


def _recipe_device(cfg: DictConfig) -> torch.device:
    """The device the trainer will use (under torchrun on CUDA: this process's GPU)."""
    device = resolve_device(cfg.get("device"))
    if distributed.is_distributed() and device.type == "cuda" and device.index is None:
        device = torch.device("cuda", distributed.local_rank())
    return device


def run_inputs(cfg: DictConfig) -> RunInputs:
    """What ``Trainer.train`` needs to train ``cfg``: the model, loaders and training params built from it, the
    recipe's own context fields, and its files (``recipe.yaml``, and Hydra's ``.hydra/`` when a Hydra app is
    running), written once everything is validated."""
    join_process_group(cfg)
    built = build_from_recipe(cfg)
    extras = {"architecture": to_plain(cfg.get("architecture")), "arch_params": to_plain(cfg.get("arch_params")),
              "checkpoint_params": to_plain(cfg.get("checkpoint_params"))}
    writes: List[Callable[[Path], None]] = [lambda directory: _save_recipe(cfg, directory / RECIPE_FILE)]
    hydra_files = _hydra_dir_writer(cfg)
    if hydra_files is not None:
        writes.append(hydra_files)
    return RunInputs(model=built["model"], training_params=built["training_params"],
                     train_loader=built["train_loader"], valid_loader=built["valid_loader"],
                     test_loaders=built["test_loaders"], context_extras=extras, first_writes=writes)


def recipe_experiment_dir(cfg: DictConfig) -> Path:
    """``<ckpt_root_dir>/<experiment_name>`` of a recipe."""
    return Path(sg_compat.ckpt_root(cfg.get("ckpt_root_dir"))) / str(cfg.experiment_name)  # SG's null: the default


def _hydra_dir_writer(cfg: DictConfig) -> Optional[Callable[[Path], None]]:
    """Inside a Hydra app: what Hydra would have written into ``<output dir>/.hydra`` at job start, written
    instead into the run dir once the run is validated (the shipped ``base`` sets ``hydra.output_subdir: null``,
    so Hydra writes nothing early), and Hydra's job log moved there. None outside a Hydra app, or when Hydra has
    written it already."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return None
    hydra_cfg = HydraConfig.get()
    if hydra_cfg.output_subdir is not None:  # a recipe without base: Hydra has written it already
        return None
    output_dir = Path(hydra_cfg.runtime.output_dir).resolve()
    files = {"config.yaml": cfg, "hydra.yaml": HydraConfig.instance().cfg, "overrides.yaml": hydra_cfg.overrides.task}

    def write(run_dir: Path) -> None:
        for name, node in files.items():
            atomic_write_text(run_dir / HYDRA_DIR / name, OmegaConf.to_yaml(node), make_dirs=True)  # .hydra/ made here
        _move_job_log(output_dir, run_dir)

    return write


def _move_job_log(output_dir: Path, run_dir: Path) -> None:
    """Re-point Hydra's job log file (a handler of the root logger, opened on its first line) from Hydra's output
    dir (the experiment dir) into the run dir, so each run keeps its own log."""
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler) and Path(handler.baseFilename).parent == output_dir:
            handler.acquire()
            try:
                handler.close()  # reopened at the next line, at the new path
                handler.baseFilename = str((run_dir / Path(handler.baseFilename).name).resolve())
            finally:
                handler.release()


def join_process_group(cfg: DictConfig) -> None:
    """Under torchrun, join before the loaders are built, so they can be sharded."""
    device = cfg.get("device")
    target = torch.device(device) if device else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    distributed.init_from_env(target)


def _save_recipe(cfg: DictConfig, path: Path) -> None:
    """The recipe as trained, interpolations resolved where they can be (Hydra's resolvers only exist
    inside a Hydra run)."""
    try:
        container = OmegaConf.to_container(cfg, resolve=True)
    except Exception:  # an interpolation that only resolves inside Hydra: keep it as written
        container = OmegaConf.to_container(cfg, resolve=False)
    if isinstance(container, dict):
        container.pop("hydra", None)
    atomic_write_text(path, OmegaConf.to_yaml(OmegaConf.create(container), resolve=False))
