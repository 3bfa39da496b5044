"""A detector's membership signal: how confidently it finds each image's true boxes."""

from __future__ import annotations

import numpy as np
import torch
from torchvision.ops import box_iou

from visionops.evaluation.membership import Signals, logit
from visionops.tasks.detection import detector
from visionops.tasks.detection.metrics import MATCH_IOU, truths


def found_confidence(pred: detector.Detection, true: dict) -> float:
    """The mean over the true boxes of the best score of a same-class ranked detection at IoU >= .5 (0 when
    none); an image without boxes: 1 - its best detection's score."""
    if len(true["labels"]) == 0:
        return 1.0 - float(pred["scores"].max(initial=0.0))
    if len(pred["labels"]) == 0:
        return 0.0
    iou = box_iou(torch.as_tensor(true["boxes"]), torch.as_tensor(pred["boxes"])).numpy()
    hit = (iou >= MATCH_IOU) & (true["labels"][:, None] == pred["labels"][None, :])
    return float(np.where(hit, pred["scores"][None, :], 0.0).max(1).mean())


def signals(model: detector.Detector, batch_size: int) -> Signals:
    """(loss, phi) per image from the found confidence c of the ranked detections (every detector has them;
    torchvision's give no loss in eval mode): loss = -log c, phi = logit(c)."""

    def read(split, index: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        ranked = detector.predict(model, np.asarray(split.images)[index], batch_size=batch_size, ranked=True)
        true = truths(np.asarray(split.targets["boxes"])[index], np.asarray(split.targets["box_labels"])[index])
        c = np.array([found_confidence(p, t) for p, t in zip(ranked, true)])
        return -np.log(np.clip(c, 1e-12, 1.0)), logit(c)

    return read
