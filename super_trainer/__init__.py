"""super_trainer: a PyTorch training SDK built around callback events."""
from .callbacks.base import Callback, CallbackHandler, Phase, PhaseCallback, PhaseContext, Priority
from .callbacks.csv_logger import CSVLogger
from .callbacks.early_stop import EarlyStop
from .checkpoint import CheckpointError, load_checkpoint_to_model, transfer_weights
from .result import TrainingResult
from .trainer import Trainer
from . import models as _models  # noqa: F401  (registers the built-in models)
from . import sg_compat as _sg_compat  # noqa: F401  (SuperGradients _target_ paths resolve to their equivalents)
from . import data as _data  # noqa: F401  (registers the built-in datasets)

__version__ = "0.3.0"

__all__ = [
    "Callback", "CallbackHandler", "CSVLogger", "EarlyStop", "Phase", "PhaseCallback", "PhaseContext", "Priority",
    "Trainer", "TrainingResult", "CheckpointError", "load_checkpoint_to_model", "transfer_weights",
    "__version__",
]
