"""What detection's training loop selects by: the val loss and val mAP@.5 of the decoded detections."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from visionops.config import TrainConfig
from visionops.tasks.detection.detector import Detector
from visionops.tasks.detection.metrics import mean_average_precision, truths
from visionops.training.device import autocast
from visionops.training.trainer import Evaluate

METRIC = "map_50"


@torch.no_grad()
def evaluate_split(model: Detector, x: Tensor, boxes: Tensor, labels: Tensor, class_names: list[str], cfg: TrainConfig,
                   device: torch.device) -> dict:
    """Loss and mAP@.5 (detections above the rule's mAP score threshold) on uint8 NCHW images on the device."""
    model.eval()
    loss, preds = 0.0, []
    for start in range(0, len(x), cfg.eval_batch_size):
        xb = x[start : start + cfg.eval_batch_size].float().div_(255)
        tb = (boxes[start : start + cfg.eval_batch_size], labels[start : start + cfg.eval_batch_size])
        with autocast(device, cfg.amp):
            z = model.normalise(xb)
            out = model.net(z)
            if not isinstance(out, (list, tuple)):  # torchvision detectors give no loss in eval mode
                loss += float(model.net.loss(z, out, *tb)) * len(xb)
        dets = model.decode(out, ranked=True)
        preds += [{"boxes": b.float(), "scores": s.float(), "labels": lab} for b, s, lab in dets]
    true = truths(boxes.cpu().numpy(), labels.cpu().numpy())
    result = mean_average_precision([{k: v.cpu() for k, v in p.items()} for p in preds], true, class_names)
    return {"loss": loss / max(len(x), 1), METRIC: result[METRIC]}


def val_scorer(val: tuple[Tensor, Tensor, Tensor], class_names: list[str], cfg: TrainConfig, device: torch.device) -> Evaluate:
    return lambda model: evaluate_split(model, *val, class_names, cfg, device)


def to_device(images_nhwc: np.ndarray, boxes: np.ndarray, labels: np.ndarray, device: torch.device):
    """uint8 NCHW images, float boxes and int64 box labels on the device (kept there for all epochs)."""
    x = torch.from_numpy(np.array(images_nhwc)).permute(0, 3, 1, 2).contiguous().to(device)
    return x, torch.from_numpy(np.asarray(boxes, np.float32)).to(device), torch.from_numpy(np.asarray(labels, np.int64)).to(device)
