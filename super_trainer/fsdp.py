"""FSDP2 (``torch.distributed.fsdp.fully_shard``) for the trainer: recognise a sharded model, shard a plain one,
gather and restore full state dicts, clip over the sharded gradient norm.

A model is *FSDP2* when any of its modules is an ``FSDPModule`` (what ``fully_shard`` turns a module into);
its parameters are then ``DTensor`` shards, one slice per rank. What this module promises:

- :func:`check_parallel_wrapping` rejects FSDP1 (``FullyShardedDataParallel``) with one clear error — its
  ``state_dict()`` is a collective, so a rank-0-only checkpoint deadlocks — and an FSDP2 model with parameters
  left unsharded (each rank would train its own copy of them, silently).
- :func:`shard_model` (``fsdp: true``) shards each block, then the root (:func:`default_blocks`).
- :func:`full_state_dicts` gathers the model's and the optimizer's full (unsharded) state dicts onto rank 0's
  CPU: plain ``state_dict()`` keys and tensors, so ``plain_model.load_state_dict(...)`` and
  ``plain_optimizer.load_state_dict(...)`` take them. **Every rank must call it** (it all-gathers).
- :func:`load_full_state_dicts` puts such dicts back into the sharded model and optimizer. Every rank calls
  it; only rank 0 needs the dicts (it broadcasts), so ranks without a shared filesystem resume too.
- :func:`clip_grad_norm` clips by the norm of all shards together (the single-process norm).
- :func:`save_sharded_checkpoint` / :func:`load_sharded_checkpoint`: the option for models too big to gather
  (``torch.distributed.checkpoint``: one file per rank, never the full model in one place).

Importing this module does not import ``torch.distributed.fsdp``; the checks are free for models that were
never sharded (nothing can be an FSDP module before that package is imported).
"""
from __future__ import annotations

import fnmatch
import sys
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn

__all__ = ["FSDP_DEFAULTS", "checked_fsdp_params", "is_fsdp2", "is_fsdp1", "check_parallel_wrapping",
           "default_blocks", "shard_model", "full_state_dicts", "load_full_state_dicts", "clip_grad_norm",
           "global_grad_norm", "save_sharded_checkpoint", "load_sharded_checkpoint"]


#: ``training_params.fsdp_params``: which modules ``fsdp: true`` shards before the root, and whether a block's
#: gathered weights are freed after its forward (see :func:`default_blocks`, :func:`shard_model`).
FSDP_DEFAULTS: Dict[str, Any] = {"blocks": None, "reshard_after_forward": True, "checkpoint": "full"}


def checked_fsdp_params(given: Any) -> Dict[str, Any]:
    """``fsdp_params`` merged over :data:`FSDP_DEFAULTS`; ValueError naming the bad entry."""
    given = {} if given is None else given
    if not isinstance(given, Mapping) or set(given) - set(FSDP_DEFAULTS):
        raise ValueError(f"training_params.fsdp_params: must be a mapping with keys {list(FSDP_DEFAULTS)}, "
                         f"got {given!r}")
    merged = {**FSDP_DEFAULTS, **given}
    blocks = merged["blocks"]
    if blocks is not None and (isinstance(blocks, str) or not isinstance(blocks, Sequence)
                               or not all(isinstance(b, str) and b for b in blocks)):
        raise ValueError("training_params.fsdp_params.blocks: must be a list of module class names or qualified-name "
                         f"patterns, got {blocks!r}")
    if not isinstance(merged["reshard_after_forward"], bool):
        raise ValueError("training_params.fsdp_params.reshard_after_forward: must be true or false, got "
                         f"{merged['reshard_after_forward']!r}")
    if merged["checkpoint"] not in ("full", "sharded"):
        raise ValueError("training_params.fsdp_params.checkpoint: 'full' (gathered state dicts in the .pth files) or "
                         f"'sharded' (torch.distributed.checkpoint shards, one file per rank), got {merged['checkpoint']!r}")
    return {**merged, "blocks": list(blocks) if blocks is not None else None}


def _fsdp_loaded() -> bool:
    return "torch.distributed.fsdp" in sys.modules


def is_fsdp2(model: nn.Module) -> bool:
    """True when ``fully_shard`` was applied to ``model`` or to any module inside it."""
    if not _fsdp_loaded():
        return False
    from torch.distributed.fsdp import FSDPModule

    return any(isinstance(module, FSDPModule) for module in model.modules())


def is_fsdp1(model: nn.Module) -> bool:
    """True when ``model`` is, or holds, a ``FullyShardedDataParallel`` (FSDP1) wrapper."""
    if not _fsdp_loaded():
        return False
    from torch.distributed.fsdp import FullyShardedDataParallel

    return any(isinstance(module, FullyShardedDataParallel) for module in model.modules())


def check_parallel_wrapping(model: nn.Module, fsdp_requested: bool = False) -> None:
    """ValueError, before anything is built, for the sharding setups the trainer cannot train correctly."""
    if is_fsdp1(model):
        raise ValueError("model: FullyShardedDataParallel (FSDP1) is not supported (its state_dict is a collective "
                         "the checkpoints would deadlock on); shard the plain model with "
                         "torch.distributed.fsdp.fully_shard (FSDP2) instead, or pass it unwrapped with fsdp: true")
    if not is_fsdp2(model):
        return
    if fsdp_requested:
        raise ValueError("training_params.fsdp: the model is already sharded with fully_shard; set fsdp: false "
                         "(the trainer trains it as sharded)")
    from torch.distributed.tensor import DTensor

    plain = [name for name, p in model.named_parameters() if not isinstance(p, DTensor)]
    if plain:
        shown = ", ".join(plain[:3]) + (f" and {len(plain) - 3} more" if len(plain) > 3 else "")
        raise ValueError(f"model: fully_shard was applied to part of the model; {shown} are not sharded, so each "
                         "rank would train its own copy of them. Call fully_shard(model) on the root module too")


def default_blocks(model: nn.Module, blocks: Optional[Sequence[str]] = None) -> List[nn.Module]:
    """The modules :func:`shard_model` shards before the root.

    Default: each direct child of the root that owns parameters (a ResNet's stages, an MLP's layers). With
    ``blocks`` (``fsdp_params.blocks``): every module whose class name or qualified name matches one of the
    patterns (``fnmatch``: ``"TransformerBlock"``, ``"encoder.layers.*"``), for models whose repeated blocks sit
    deeper (Hugging Face's ``model.layers.N``). Sharding a block means its parameters are gathered only while it
    runs, so peak memory is about one block's full weights plus every block's shard.
    """
    if blocks is None:
        return [child for child in model.children() if any(True for _ in child.parameters())]
    def matches(name: str, module: nn.Module) -> bool:
        return any(fnmatch.fnmatchcase(type(module).__name__, p) or fnmatch.fnmatchcase(name, p) for p in blocks)

    chosen = [module for name, module in model.named_modules() if name and matches(name, module)]
    if not chosen:
        raise ValueError(f"training_params.fsdp_params.blocks: no module of the model matches {list(blocks)!r} "
                         "(give class names such as 'TransformerBlock' or qualified names such as 'layers.*')")
    return chosen


def shard_model(model: nn.Module, device: torch.device, blocks: Optional[Sequence[str]] = None,
                reshard_after_forward: bool = True) -> nn.Module:
    """``fsdp: true``: ``fully_shard`` each block of :func:`default_blocks`, then the root, over all ranks.

    Call it on the plain model after ``.to(device)`` and before building the optimizer (the optimizer must
    hold the sharded parameters). ``reshard_after_forward`` (``fsdp_params``): free the gathered weights
    after each block's forward (less memory, one more all-gather in backward) — FSDP2's default.
    Returns ``model`` itself, now an ``FSDPModule``.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from .distributed import world_size

    mesh = init_device_mesh(device.type, (world_size(),))
    for block in default_blocks(model, blocks):
        fully_shard(block, mesh=mesh, reshard_after_forward=reshard_after_forward)
    fully_shard(model, mesh=mesh, reshard_after_forward=reshard_after_forward)
    return model


def _full_options(**extra: Any) -> Any:
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, **extra)


def full_state_dicts(model: nn.Module, optimizer: Optional[torch.optim.Optimizer] = None
                     ) -> Tuple[Optional[Dict[str, Any]], Optional[Dict[str, Any]]]:
    """``(model_state_dict, optimizer_state_dict)`` of an FSDP2 model, gathered to full tensors on rank 0's CPU.

    A collective: every rank calls it at the same point; rank 0 gets the dicts, the other ranks ``(None, None)``.
    The model dict has the plain module's keys; the optimizer dict has ``torch.optim`` 's own layout (parameter
    indices in param-group order, as ``optimizer.state_dict()`` of the same model built plainly), so a
    checkpoint loads into an unsharded model and optimizer with ``load_state_dict``.
    """
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    from .distributed import is_main_process

    options = _full_options(cpu_offload=True)
    model_state = get_model_state_dict(model, options=options)
    if optimizer is not None and not optimizer.state:
        # before the first step: get_optimizer_state_dict would create the state with a zero-gradient step()
        # (Adam's step count then starts at 1); the state is empty on every rank, so there is nothing to gather
        fresh = optimizer.state_dict()
        return (model_state, fresh) if is_main_process() else (None, None)
    optim_state = get_optimizer_state_dict(model, optimizer, options=options) if optimizer is not None else None
    if not is_main_process():
        return None, None
    return model_state, (_indexed_optimizer_state(optim_state) if optim_state is not None else None)


def _indexed_optimizer_state(by_name: Mapping[str, Any]) -> Dict[str, Any]:
    """torch.distributed.checkpoint's optimizer dict (keyed by parameter name) → ``Optimizer.state_dict()``'s
    layout (keyed by the parameter's position over all param groups)."""
    index: Dict[str, int] = {}
    groups = []
    for group in by_name["param_groups"]:
        ids = []
        for name in group["params"]:
            index.setdefault(name, len(index))
            ids.append(index[name])
        groups.append({**group, "params": ids})
    state = {index[name]: value for name, value in by_name["state"].items()}
    return {"state": state, "param_groups": groups}


def _named_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer,
                           indexed: Mapping[str, Any]) -> Dict[str, Any]:
    """The inverse of :func:`_indexed_optimizer_state`, naming positions after this optimizer's parameters."""
    names = {id(p): name for name, p in model.named_parameters()}
    ordered = [names[id(p)] for group in optimizer.param_groups for p in group["params"]]
    saved = [len(group["params"]) for group in indexed["param_groups"]]
    if saved != [len(group["params"]) for group in optimizer.param_groups]:
        raise ValueError(f"the checkpoint's optimizer has param groups of sizes {saved}; this optimizer's are "
                         f"{[len(g['params']) for g in optimizer.param_groups]}")
    groups = [{**group, "params": [ordered[i] for i in group["params"]]} for group in indexed["param_groups"]]
    return {"state": {ordered[int(i)]: value for i, value in indexed["state"].items()}, "param_groups": groups}


def load_full_state_dicts(model: nn.Module, optimizer: Optional[torch.optim.Optimizer],
                          model_state: Optional[Mapping[str, Any]],
                          optimizer_state: Optional[Mapping[str, Any]] = None) -> None:
    """Load full state dicts (as :func:`full_state_dicts` returns, or a plain model's) into an FSDP2 model and
    its optimizer. A collective: every rank calls it; rank 0's dicts are broadcast, the others' are ignored
    (they may pass None), so only rank 0 has to read the checkpoint file."""
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    from .distributed import is_main_process

    main = is_main_process()
    options = _full_options(broadcast_from_rank0=True)
    set_model_state_dict(model, dict(model_state) if main and model_state is not None else {}, options=options)
    if optimizer is not None and (optimizer_state is not None or not main):
        named = _named_optimizer_state(model, optimizer, optimizer_state) if main else {}
        set_optimizer_state_dict(model, optimizer, named, options=options)
        for group in optimizer.param_groups:  # the broadcast turns tuples (Adam's betas) into lists
            for key, default in optimizer.defaults.items():
                if isinstance(default, tuple) and isinstance(group.get(key), list):
                    group[key] = tuple(group[key])


def global_grad_norm(parameters: Iterable[torch.Tensor], norm_type: float = 2.0) -> torch.Tensor:
    """The norm of all gradients taken together, over every rank's shards for FSDP2 (a collective then): the
    number one process training the whole model would get. A plain tensor; 0 when there are no gradients."""
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return torch.zeros(())
    norm = torch.nn.utils.get_total_norm(grads, norm_type)
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm


def clip_grad_norm(parameters: Iterable[torch.Tensor], max_norm: float, norm_type: float = 2.0) -> torch.Tensor:
    """``torch.nn.utils.clip_grad_norm_`` that also returns a plain tensor for sharded (DTensor) gradients:
    the clip coefficient comes from :func:`global_grad_norm`, so every rank scales its shards alike."""
    params = [p for p in parameters if p.grad is not None]
    total = global_grad_norm(params, norm_type)
    if params:
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, total)
    return total


def save_sharded_checkpoint(directory: Union[str, Path], model: nn.Module, optimizer: Optional[torch.optim.Optimizer],
                            extra: Optional[Mapping[str, Any]] = None) -> None:
    """For models too big to gather on one host: ``torch.distributed.checkpoint`` writes each rank's shards of the
    model, the optimizer and ``extra`` (e.g. ``{"ema": ema.sharded_state_dict(), "epoch": 3}``) into
    ``directory`` — one file per rank plus metadata; no rank ever holds the full model. A collective. Every rank
    must see the same filesystem. Written into ``<directory>.tmp`` and renamed by rank 0 once every rank is done,
    so an interrupted write never replaces a complete checkpoint. Loading takes any world size
    (:func:`load_sharded_checkpoint`); the files do not load into a plain model with ``load_state_dict``."""
    import shutil

    import torch.distributed as dist
    from torch.distributed.checkpoint import save
    from torch.distributed.checkpoint.state_dict import get_state_dict

    from .distributed import is_main_process

    directory = Path(directory)
    staging = directory.with_name(directory.name + ".tmp")
    if optimizer is not None and not optimizer.state:
        optimizer = None  # before the first step get_state_dict would create the state with a zero-gradient step()
    model_state, optim_state = get_state_dict(model, optimizer if optimizer is not None else [])
    save({"model": model_state, "optimizer": optim_state, **dict(extra or {})}, checkpoint_id=str(staging))
    dist.barrier()
    if is_main_process():
        if directory.exists():
            shutil.rmtree(directory)
        staging.rename(directory)
    dist.barrier()


def load_sharded_checkpoint(directory: Union[str, Path], model: nn.Module,
                            optimizer: Optional[torch.optim.Optimizer], extra: Optional[Dict[str, Any]] = None) -> None:
    """Read what :func:`save_sharded_checkpoint` wrote into the sharded ``model`` and ``optimizer`` (resharding
    when the world size changed), and into the tensors of ``extra`` in place (give the same keys as saved, e.g.
    ``{"ema": ema.sharded_state_dict()}``; other values are replaced in the dict). A collective."""
    from torch.distributed.checkpoint import load
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    if optimizer is not None and not optimizer.state and not _holds_optimizer_state(directory):
        optimizer = None  # written before the first step: nothing to restore (and no zero-gradient step())
    model_state, optim_state = get_state_dict(model, optimizer if optimizer is not None else [])
    state = {"model": model_state, "optimizer": optim_state, **(extra if extra is not None else {})}
    load(state, checkpoint_id=str(directory))
    set_state_dict(model, optimizer if optimizer is not None else [], model_state_dict=state["model"],
                   optim_state_dict=state["optimizer"])
    if extra is not None:
        extra.update({key: state[key] for key in extra})


def _holds_optimizer_state(directory: Union[str, Path]) -> bool:
    """Whether a sharded checkpoint has optimizer entries (one written before the first step has none)."""
    from torch.distributed.checkpoint import FileSystemReader

    keys = FileSystemReader(str(directory)).read_metadata().state_dict_metadata
    return any(key.startswith("optimizer.") for key in keys)

