"""Callbacks: the event API (base) and the built-in callbacks, one small module each."""
from .average_models import AverageBestModels
from .base import EVENTS, Callback, CallbackHandler, Phase, PhaseCallback, PhaseContext, Priority
from .cancel import CancelTrainingCallback
from .conversion import ModelConversionCheckCallback
from .csv_logger import CSVLogger
from .early_stop import EarlyStop
from .ema import EMAUpdate
from .epoch_summary import EpochSummary
from .grad_clip import GradientClipping
from .grad_norm import GradientNormLogger
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
from .mlflow_logger import MLflowLogger
from .mmcv_adapter import MMCVHook, MMCVHookAdapter
from .plateau import ReduceLROnPlateauCallback
from .progress import ProgressBar
from .stage_switch import TrainingStageSwitchCallbackBase
from .stop_non_finite import StopOnNonFiniteLoss
from .visualization import BatchVisualizationCallback
from .yolo_warmup import YoloV5LRWarmup
from ..registry import CALLBACKS

for _callback in (CSVLogger, EarlyStop, AverageBestModels, EMAUpdate, GradientClipping, BaseLogger, TensorBoardLogger, ProgressBar, EpochSummary,
                  LinearEpochLRWarmup,
                  LinearBatchLRWarmup, StepLRSchedule, CosineLRSchedule, PolyLRSchedule, ExpLRSchedule,
                  FunctionLRSchedule, CancelTrainingCallback, ReduceLROnPlateauCallback, StopOnNonFiniteLoss,
                  GradientNormLogger, BatchVisualizationCallback, ModelConversionCheckCallback, MMCVHookAdapter,
                  TrainingStageSwitchCallbackBase, YoloV5LRWarmup, MLflowLogger):
    CALLBACKS.register(_callback)

__all__ = [
    "EVENTS", "Callback", "CallbackHandler", "Phase", "PhaseCallback", "PhaseContext", "Priority",
    "CSVLogger", "EarlyStop", "AverageBestModels", "EMAUpdate", "GradientClipping", "BaseLogger", "TensorBoardLogger", "ProgressBar",
    "EpochSummary",
    "LinearEpochLRWarmup", "LinearBatchLRWarmup", "StepLRSchedule", "CosineLRSchedule", "PolyLRSchedule",
    "ExpLRSchedule", "FunctionLRSchedule", "TorchSchedulerCallback",
    "CancelTrainingCallback", "ReduceLROnPlateauCallback", "StopOnNonFiniteLoss", "GradientNormLogger",
    "BatchVisualizationCallback", "ModelConversionCheckCallback", "MMCVHookAdapter", "MMCVHook",
    "TrainingStageSwitchCallbackBase", "YoloV5LRWarmup", "MLflowLogger",
]
