"""Callbacks: the event API (base) and the built-in callbacks, one small module each."""
from .average_models import AverageBestModels
from .base import EVENTS, Callback, CallbackHandler, Phase, PhaseCallback, PhaseContext, Priority
from .csv_logger import CSVLogger
from .early_stop import EarlyStop
from .ema import EMAUpdate
from .epoch_summary import EpochSummary
from .grad_clip import GradientClipping
from .logging import BaseLogger, TensorBoardLogger
from .lr import (
    CosineLRSchedule,
    ExpLRSchedule,
    FunctionLRSchedule,
    LinearBatchLRWarmup,
    LinearEpochLRWarmup,
    PolyLRSchedule,
    StepLRSchedule,
    TorchSchedulerCallback,
)
from .progress import ProgressBar
from ..registry import CALLBACKS

for _callback in (CSVLogger, EarlyStop, AverageBestModels, EMAUpdate, GradientClipping, BaseLogger, TensorBoardLogger, ProgressBar, EpochSummary,
                  LinearEpochLRWarmup,
                  LinearBatchLRWarmup, StepLRSchedule, CosineLRSchedule, PolyLRSchedule, ExpLRSchedule,
                  FunctionLRSchedule):
    CALLBACKS.register(_callback)

__all__ = [
    "EVENTS", "Callback", "CallbackHandler", "Phase", "PhaseCallback", "PhaseContext", "Priority",
    "CSVLogger", "EarlyStop", "AverageBestModels", "EMAUpdate", "GradientClipping", "BaseLogger", "TensorBoardLogger", "ProgressBar",
    "EpochSummary",
    "LinearEpochLRWarmup", "LinearBatchLRWarmup", "StepLRSchedule", "CosineLRSchedule", "PolyLRSchedule",
    "ExpLRSchedule", "FunctionLRSchedule", "TorchSchedulerCallback",
]
