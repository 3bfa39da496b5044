"""Segmentation metrics from one pixel confusion matrix: per-class IoU (Jaccard) and mIoU, pixel
accuracy and Dice, each image's own mIoU too.

mIoU is the mean of the per-class IoUs over all classes, background included; a class that neither
occurs nor is predicted in the scored pixels has no IoU and is left out of the mean (torchmetrics would
count it as 0). Dice per class is the F1 score of its pixels (2TP / (2TP + FP + FN)).

Written here rather than with torchmetrics' Multiclass{JaccardIndex,F1Score,Accuracy}, which give the
same numbers (tests/test_segmentation_stages.py checks them against each other): on the preset's test
split, importing torchmetrics and running its three metrics takes 4.9 s, and this module 0.67 s
(`python bench/bench_segmentation_metrics.py`), in each of the four stages that score masks.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from visionops.tasks.segmentation.segmenter import IGNORE


def confusion(pred: Tensor, target: Tensor, num_classes: int) -> Tensor:
    """K x K pixel counts (rows true, columns predicted) over the pixels not marked IGNORE."""
    keep = target != IGNORE
    idx = target[keep].long() * num_classes + pred[keep].long()
    return torch.bincount(idx, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def image_confusions(pred: Tensor, target: Tensor, num_classes: int) -> Tensor:
    """N x K x K: each image's own `confusion`, in one bincount."""
    n, kk = len(target), num_classes * num_classes
    image = torch.arange(n).view(n, *([1] * (target.dim() - 1))).expand_as(target)
    keep = target != IGNORE
    idx = image[keep] * kk + target[keep].long() * num_classes + pred[keep].long()
    return torch.bincount(idx, minlength=n * kk).reshape(n, num_classes, num_classes)


def _ious(cm: Tensor) -> tuple[Tensor, Tensor]:
    """(IoU per class, whether the class occurs in truth or prediction) for `... x K x K` confusions."""
    tp = cm.diagonal(dim1=-2, dim2=-1).double()
    union = cm.sum(-2).double() + cm.sum(-1).double() - tp
    return tp / union.clamp(min=1), union > 0


def miou_from_confusion(cm: Tensor) -> float:
    iou, seen = _ious(cm)
    return float(iou[seen].mean()) if seen.any() else float("nan")


def segmentation_metrics(pred: Tensor, target: Tensor, class_names: list[str]) -> dict:
    """mIoU, per-class IoU, pixel accuracy and Dice for predicted and true masks (N x H x W)."""
    cm = confusion(pred, target, len(class_names))
    iou, seen = _ious(cm)
    tp = cm.diagonal().double()
    dice = 2 * tp / (cm.sum(0) + cm.sum(1)).double().clamp(min=1)
    per_class = {
        name: {
            "iou": float(iou[i]) if seen[i] else None,
            "dice": float(dice[i]) if seen[i] else None,
            "pixels": int(cm[i].sum()),
        }
        for i, name in enumerate(class_names)
    }
    total = int(cm.sum())
    return {
        "miou": float(iou[seen].mean()) if seen.any() else math.nan,
        "pixel_accuracy": float(tp.sum() / total) if total else math.nan,
        "dice": float(dice[seen].mean()) if seen.any() else math.nan,
        "per_class": per_class,
        "pixels": total,
    }


def image_miou(pred: Tensor, target: Tensor, num_classes: int) -> list[float]:
    """Each image's own mIoU over the classes present in its truth or its prediction."""
    iou, seen = _ious(image_confusions(pred, target, num_classes))
    means = (iou * seen).sum(-1) / seen.sum(-1)  # nan for an image with no scored pixel
    return [float(v) for v in means]
