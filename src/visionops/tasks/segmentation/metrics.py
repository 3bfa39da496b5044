"""Segmentation metrics from torchmetrics: per-class IoU (Jaccard) and mIoU, pixel accuracy and Dice.

mIoU is the mean of the per-class IoUs over all classes, background included; a class that neither
occurs nor is predicted in the scored pixels has no IoU and is left out of the mean (torchmetrics would
count it as 0). Dice per class is the F1 score of its pixels (2TP / (2TP + FP + FN)).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from visionops.tasks.segmentation.segmenter import IGNORE


def confusion(pred: Tensor, target: Tensor, num_classes: int) -> Tensor:
    """K x K pixel counts (rows true, columns predicted) over the pixels not marked IGNORE: the
    cheap on-device tally training's val scorer uses every epoch (the same IoU torchmetrics gives)."""
    keep = target != IGNORE
    idx = target[keep].long() * num_classes + pred[keep].long()
    return torch.bincount(idx, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def miou_from_confusion(cm: Tensor) -> float:
    tp = cm.diag().double()
    union = cm.sum(0).double() + cm.sum(1).double() - tp
    present = union > 0
    return float((tp[present] / union[present]).mean()) if present.any() else float("nan")


def segmentation_metrics(pred: Tensor, target: Tensor, class_names: list[str]) -> dict:
    """mIoU, per-class IoU, pixel accuracy and Dice for predicted and true masks (N x H x W)."""
    from torchmetrics.classification import MulticlassAccuracy, MulticlassF1Score, MulticlassJaccardIndex

    k = len(class_names)
    pred, target = pred.long(), target.long()
    iou = MulticlassJaccardIndex(k, average="none", ignore_index=IGNORE)(pred, target)
    dice = MulticlassF1Score(k, average="none", ignore_index=IGNORE, multidim_average="global")(pred, target)
    pixel_acc = MulticlassAccuracy(k, average="micro", ignore_index=IGNORE)(pred, target)
    cm = confusion(pred, target, k)
    seen = (cm.sum(0) + cm.sum(1)) > 0  # occurs in truth or prediction
    per_class = {
        name: {
            "iou": float(iou[i]) if seen[i] else None,
            "dice": float(dice[i]) if seen[i] else None,
            "pixels": int(cm[i].sum()),
        }
        for i, name in enumerate(class_names)
    }
    ious = [v["iou"] for v in per_class.values() if v["iou"] is not None]
    dices = [v["dice"] for v in per_class.values() if v["dice"] is not None]
    return {
        "miou": sum(ious) / len(ious) if ious else math.nan,
        "pixel_accuracy": float(pixel_acc),
        "dice": sum(dices) / len(dices) if dices else math.nan,
        "per_class": per_class,
        "pixels": int(cm.sum()),
    }


def image_miou(pred: Tensor, target: Tensor, num_classes: int) -> list[float]:
    """Each image's own mIoU over the classes present in its truth or its prediction."""
    return [miou_from_confusion(confusion(p, t, num_classes)) for p, t in zip(pred, target)]
