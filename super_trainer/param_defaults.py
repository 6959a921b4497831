"""The defaults of every ``training_params`` key (SPEC §2, docs/training_params.md) and the tables of
SuperGradients' keys: the data that ``params.py`` validates against."""
from __future__ import annotations

from typing import Any, Dict, Tuple

from .fsdp import FSDP_DEFAULTS
from .params_runs import RUN_DEFAULTS

__all__ = ["REQUIRED", "EMA_DEFAULTS", "DEFAULT_TRAINING_PARAMS", "SG_RECIPE_KEYS", "SG_UNSUPPORTED_DEFAULTS",
           "SG_NO_OP_VALUES", "HYDRA_KEYS", "MIXED_PRECISION_VALUES", "SG_LOGGERS", "TORCH_COMPILE_OPTIONS"]


class _Required:
    """Marks a key without a default; one instance, kept through copies."""

    def __repr__(self) -> str:
        return "<required>"

    def __deepcopy__(self, memo: Dict[int, Any]) -> "_Required":
        return self


REQUIRED: Any = _Required()

EMA_DEFAULTS: Dict[str, Any] = {"decay": 0.9999, "decay_type": "exp", "beta": 15.0, "start_step": 0, "interval": 1}

DEFAULT_TRAINING_PARAMS: Dict[str, Any] = {
    "max_epochs": REQUIRED,
    "initial_lr": None,
    "optimizer": "SGD",
    "optimizer_params": {},
    "zero_weight_decay_on_bias_and_bn": False,
    "loss": "CrossEntropyLoss",
    "criterion_params": {},
    "loss_logging_items_names": None,
    "batch_adapter": None,
    "train_step": None,
    "train_metrics_list": [],
    "valid_metrics_list": ["Accuracy"],
    "test_metrics_list": None,
    "metric_to_watch": "Accuracy",
    "greater_metric_to_watch_is_better": None,  # unset: False for a loss key, else True (resolve_metric_direction)
    "lr_mode": None,
    "lr_warmup_epochs": 0,
    "lr_warmup_steps": 0,
    "lr_cooldown_epochs": 0,
    "warmup_initial_lr": None,
    "warmup_mode": None,
    "lr_updates": None,  # [] once resolved; None in recipes, so a list and a _target_ node both merge over it
    "lr_decay_factor": 0.1,
    "cosine_final_lr_ratio": 0.01,
    "lr_schedule_function": None,
    "batch_accumulate": 1,
    "clip_grad_norm": None,
    "mixed_precision": False,
    "ema": False,
    "ema_params": dict(EMA_DEFAULTS),
    "log_interval": 50,
    "phase_callbacks": [],
    "run_validation_freq": 1,
    "run_test_freq": None,
    "max_train_batches": None,
    "max_valid_batches": None,
    "save_ckpt_epoch_list": [],
    "save_ckpt_every_n_steps": None,
    "max_keep_ckpts": None,
    "average_best_models": False,
    "resume": None,  # None: "auto" under torchrun's elastic agent, else False (resolve_training_params)
    "resume_path": None,
    "resume_weights_only": True,
    "seed": 42,
    "sg_logger": "tensorboard",
    "silent_mode": False,
    "progress_bar": True,
    "stop_on_non_finite_loss": True,
    # SuperGradients keys super_trainer implements with SG's meaning (SPEC §7)
    "save_model": True,
    "ckpt_name": "ckpt_latest.pth",
    "ckpt_best_name": "ckpt_best.pth",
    "sync_bn": False,
    "torch_compile": False,
    "torch_compile_mode": None,
    "torch_compile_loss": False,
    "torch_compile_options": {},
    "step_lr_update_freq": None,
    "sg_logger_params": {},
    "pre_prediction_callback": None,
    "load_opt_params": True,  # False: a resume restores the weights but not the optimizer's state (SG's meaning)
    "warmup_momentum": None,  # warmup_mode yolov5_warmup: the momentum the warmup starts from (SG 2.x's YoloV5 warmup)
    "warmup_bias_lr": None,  # warmup_mode yolov5_warmup: the lr the "bias" param group starts from
    **RUN_DEFAULTS,  # max_steps, val_check_interval, save_top_k, run_id (params_runs.py)
    # Scale (SPEC §8): data sharding under torchrun, FSDP2
    "distributed_sampler": True,
    "fsdp": False,
    "fsdp_params": dict(FSDP_DEFAULTS),
}

#: Keys SuperGradients' own recipes set that SG's trainer never reads itself: its models' initialize_param_groups /
#: update_param_groups read ``multiply_head_lr`` from training_params, and recipes interpolate
#: ``static_assigner_end_epoch`` into a callback. Accepted and kept in training_params (absent when not given) so a
#: model or callback reads them as in SG; ``building`` warns when nothing here will read multiply_head_lr.
SG_RECIPE_KEYS: Dict[str, Any] = {"multiply_head_lr": 1, "static_assigner_end_epoch": None}

#: SuperGradients 3.7 training_params keys for features super_trainer does not have, each with the value that
#: means "off" in SG (its default). That value is accepted silently; any other raises one ValueError that
#: lists every such key (SPEC §7). docs/migrating_from_supergradients.md explains each.
SG_UNSUPPORTED_DEFAULTS: Dict[str, Any] = {
    "resume_from_remote_sg_logger": False,
    "launch_tensorboard": False,
    "tensorboard_port": None,
    "tb_files_user_prompt": False,
    "save_tensorboard_to_s3": False,
    "precise_bn": False,
    "precise_bn_batch_size": None,
    "dataset_statistics": False,
    "enable_qat": False,
    "finetune": False,
    "kill_ddp_pgroup_on_end": True,
}

#: SuperGradients keys whose listed values all describe what super_trainer already does (it logs no package
#: list; a resume loads weights strictly, which fits a checkpoint of the same model either way).
SG_NO_OP_VALUES: Dict[str, Tuple[Any, ...]] = {
    "log_installed_packages": (True, False),
    "resume_strict_load": (False, True),
}

#: Hydra's instantiate flags, present when a recipe node is passed without hydra.utils.instantiate.
HYDRA_KEYS = ("_convert_", "_recursive_")

MIXED_PRECISION_VALUES = (False, True, "bf16", "bfloat16", "fp16", "float16")
SG_LOGGERS = ("tensorboard", "base", "base_sg_logger", "mlflow")
TORCH_COMPILE_OPTIONS = ("mode", "fullgraph", "dynamic", "backend", "options", "disable")
