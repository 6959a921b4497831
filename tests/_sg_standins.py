"""Stand-ins for the SuperGradients-only objects SG's training recipes name (detection, pose and segmentation losses,
metrics, callbacks and post-prediction callbacks), registered under SG's names with SG's registry decorators, as a user
without SuperGradients would register their own. They work on a classifier's logits, so SG's recipes train a tiny
classifier: the recipe's hyperparameters are what the tests check, not these objects.

Imported by the tests, and by the recipes' ``custom_imports`` in CLI subprocesses (tests/ is on PYTHONPATH there)."""
from __future__ import annotations

from typing import Any, Dict, List, Sequence

import torch
import torch.nn.functional as F
from torchmetrics import Metric

from super_trainer.callbacks import TrainingStageSwitchCallbackBase
from super_trainer.registry import register_callback, register_loss, register_metric


class _StandInLoss(torch.nn.Module):
    """Cross-entropy, plus SG-style components when ``component_names`` is set; accepts any SG criterion_params."""

    component_names: Sequence[str] = ()

    def __init__(self, **criterion_params: Any) -> None:
        super().__init__()
        self.criterion_params = criterion_params

    def forward(self, preds: torch.Tensor, target: torch.Tensor) -> Any:
        loss = F.cross_entropy(preds, target)
        if not self.component_names:
            return loss
        parts = [loss * (i + 1) / len(self.component_names) for i in range(len(self.component_names))]
        return loss, torch.stack(parts).detach()


@register_loss()
class DEKRLoss(_StandInLoss):
    component_names = ["heatmap", "offset", "total"]


@register_loss("PPYoloELoss")
class PPYoloELoss(_StandInLoss):
    component_names = ["loss_cls", "loss_iou", "loss_dfl", "loss"]


@register_loss(name="YoloXDetectionLoss")
class YoloXDetectionLoss(_StandInLoss):
    component_names = ["iou", "obj", "cls", "l1", "num_fg", "Loss"]


@register_loss(name="yolo_nas_pose_loss")
class YoloNASPoseLoss(_StandInLoss):
    component_names = ["loss_cls", "loss_iou", "loss_dfl", "loss_pose_cls", "loss_pose_reg", "loss"]


@register_loss()
class SSDLoss(_StandInLoss):
    pass


@register_loss()
class RescoringLoss(_StandInLoss):
    pass


@register_loss()
class ShelfNetOHEMLoss(_StandInLoss):
    pass


class _StandInMetric(Metric):
    """Top-1 accuracy; a compound metric (``component_names``, ``compute()`` returning a dict) when names are set."""

    full_state_update = False
    names: List[str] = []

    def __init__(self, **params: Any) -> None:
        super().__init__()
        self.params = params
        if self.names:
            self.component_names = list(self.names)
        self.add_state("correct", default=torch.tensor(0.0), dist_reduce_fx="sum")
        self.add_state("total", default=torch.tensor(0.0), dist_reduce_fx="sum")

    def update(self, preds: torch.Tensor, target: torch.Tensor) -> None:
        self.correct += (preds.argmax(dim=1) == target).sum()
        self.total += target.numel()

    def compute(self) -> Any:
        accuracy = self.correct / self.total.clamp(min=1)
        if not self.names:
            return accuracy
        return {name: accuracy * (i + 1) / len(self.names) for i, name in enumerate(self.names)}


@register_metric()
class DetectionMetrics(_StandInMetric):
    names = ["Precision@0.50:0.95", "Recall@0.50:0.95", "mAP@0.50:0.95", "F1@0.50:0.95"]


@register_metric("PoseEstimationMetrics")
class PoseEstimationMetrics(_StandInMetric):
    names = ["AP", "AR"]


@register_metric(name="BinaryIOU")
class BinaryIOU(_StandInMetric):
    names = ["target_IOU", "background_IOU", "mean_IOU"]


@register_metric()
class PixelAccuracy(_StandInMetric):
    pass


@register_metric()
class IoU(_StandInMetric):
    pass


class _PostPrediction:
    """Stands for SG's post-prediction callbacks, which recipes give to metrics as ``_target_`` nodes."""

    def __init__(self, **params: Any) -> None:
        self.params: Dict[str, Any] = params


for _name in ("PPYoloEPostPredictionCallback", "YoloXPostPredictionCallback", "SSDPostPredictCallback",
              "DEKRPoseEstimationDecodeCallback", "RescoringPoseEstimationDecodeCallback",
              "YoloNASPosePostPredictionCallback"):
    register_callback(_name)(type(_name, (_PostPrediction,), {}))


@register_callback()
class PPYoloETrainingStageSwitchCallback(TrainingStageSwitchCallbackBase):
    def __init__(self, static_assigner_end_epoch: int = 30) -> None:
        super().__init__(next_stage_start_epoch=static_assigner_end_epoch)

    def apply_stage_change(self, context: Any) -> None:
        pass


@register_callback("YoloXTrainingStageSwitchCallback")
class YoloXTrainingStageSwitchCallback(TrainingStageSwitchCallbackBase):
    def apply_stage_change(self, context: Any) -> None:
        pass
