"""The ``training_params`` keys of SPEC §8 "Steps instead of epochs" and "Checkpoint management": ``max_steps``,
``val_check_interval``, ``save_top_k`` and ``run_id``, validated like every other key (one ValueError naming the
key and what would be valid), and the step arithmetic that follows from them (the run's horizon, the epochs
``max_steps`` needs when ``max_epochs`` is not given).
"""
from __future__ import annotations

import math
from typing import Any, MutableMapping, Optional

__all__ = ["RUN_DEFAULTS", "settle_max_epochs", "validate_run_keys", "derive_max_epochs", "run_horizon",
           "check_run_id"]

#: Defaults of the keys this module validates (merged into DEFAULT_TRAINING_PARAMS).
RUN_DEFAULTS = {"max_steps": None, "val_check_interval": None, "save_top_k": None, "run_id": None}


def _error(key: str, message: str) -> ValueError:
    return ValueError(f"training_params.{key}: {message}")


def settle_max_epochs(params: MutableMapping[str, Any], required: Any) -> None:
    """``max_epochs`` may be left out when ``max_steps`` is given (as in mmcv's IterBasedRunner): it is then
    derived once the steps per epoch are known (:func:`derive_max_epochs`); None until then."""
    if params.get("max_epochs") is required and params.get("max_steps") is not None:
        params["max_epochs"] = None


def validate_run_keys(params: MutableMapping[str, Any]) -> None:
    """ValueError naming the key for a bad max_steps, val_check_interval, save_top_k or run_id."""
    max_steps = params["max_steps"]
    if max_steps is not None and (isinstance(max_steps, bool) or not isinstance(max_steps, int) or max_steps < 1):
        raise _error("max_steps", f"must be an int >= 1 (optimizer steps) or None, got {max_steps!r}")
    interval = params["val_check_interval"]
    if isinstance(interval, bool) or not (interval is None or isinstance(interval, (int, float))):
        raise _error("val_check_interval", f"must be an int >= 1 (every N optimizer steps), a float in (0, 1] "
                                           f"(a fraction of each epoch) or None, got {interval!r}")
    if isinstance(interval, int) and interval < 1 or isinstance(interval, float) and not 0.0 < interval <= 1.0:
        raise _error("val_check_interval", f"must be an int >= 1 (every N optimizer steps) or a float in (0, 1] "
                                           f"(a fraction of each epoch), got {interval!r}")
    if interval is not None and params.get("run_validation_freq", 1) != 1:
        raise _error("val_check_interval", f"and run_validation_freq={params['run_validation_freq']!r} both say "
                                           "when to validate; give one of them")
    top_k = params["save_top_k"]
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise _error("save_top_k", f"must be an int >= 1 (checkpoints kept) or None, got {top_k!r}")
    if params["run_id"] is not None:
        params["run_id"] = check_run_id(params["run_id"])
    if params.get("max_epochs") is None and params.get("step_lr_update_freq") is not None:
        raise _error("step_lr_update_freq", "needs max_epochs (it spreads decays over the epochs); give max_epochs "
                                            "with max_steps")


def check_run_id(run_id: Any) -> str:
    """A run dir name: a non-empty string (or int) without path separators, '..' or a leading dot."""
    if isinstance(run_id, bool) or not isinstance(run_id, (str, int)):
        raise _error("run_id", f"must be a run dir name (a string such as 'RUN_20240101_120000_000000'), got "
                               f"{run_id!r}")
    name = str(run_id)
    if not name.strip() or "/" in name or "\\" in name or name.startswith(".") or name != name.strip():
        raise _error("run_id", f"must be a plain directory name (no '/', '\\\\', leading dot or surrounding "
                               f"spaces), got {name!r}")
    return name


def derive_max_epochs(params: MutableMapping[str, Any], steps_per_epoch: Optional[int]) -> None:
    """With ``max_steps`` and no ``max_epochs``: the epochs that hold max_steps optimizer steps (each epoch takes
    at least one step when the loader has no len())."""
    if params.get("max_epochs") is not None:
        return
    steps = int(params["max_steps"])
    params["max_epochs"] = math.ceil(steps / steps_per_epoch) if steps_per_epoch else steps


def run_horizon(params: MutableMapping[str, Any], steps_per_epoch: Optional[int]) -> Optional[int]:
    """Optimizer steps of the whole run: steps_per_epoch · max_epochs, capped by max_steps (None when unknown)."""
    by_epochs = steps_per_epoch * int(params["max_epochs"]) if steps_per_epoch is not None else None
    max_steps = params.get("max_steps")
    if max_steps is None:
        return by_epochs
    return min(int(max_steps), by_epochs) if by_epochs is not None else int(max_steps)
