"""A trained detector bundled with its preprocessing and its prediction rule, saved and loaded as one file.

The rule (score and IoU thresholds, max detections: params.yaml's `detection` section) is stored in the
model file, so evaluate, distill, promotion and the served model all decode the same way.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from visionops.config import DetectionConfig
from visionops.models import create_model, model_file
from visionops.tasks.detection.metrics import MAP_MAX_DETECTIONS

Detection = dict[str, np.ndarray]  # boxes K x 4 xyxy (canonical pixels), scores K, labels K (class ids)


class Detector(nn.Module):
    """Images in (uint8 0..255 or float 0..1, N x C x H x W), the network's raw outputs out; the
    normalisation is inside, the decoding (`detect`) applies the stored rule."""

    def __init__(self, net: nn.Module, mean: list[float], std: list[float], rule: DetectionConfig):
        super().__init__()
        self.net, self.rule = net, rule
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def normalise(self, x: Tensor) -> Tensor:
        if x.dtype == torch.uint8:
            x = x.float() / 255
        return (x - self.mean) / self.std

    def forward(self, x: Tensor):
        return self.net(self.normalise(x))

    def loss(self, out, targets: tuple[Tensor, Tensor], x: Tensor) -> Tensor:
        """The network's training loss; `x` is the (augmented, 0..1) batch `out` came from."""
        boxes, labels = targets
        return self.net.loss(self.normalise(x), out, boxes, labels)

    @torch.no_grad()
    def detect(self, x: Tensor, ranked: bool = False) -> list[tuple[Tensor, Tensor, Tensor]]:
        return self.decode(self(x), ranked)

    @torch.no_grad()
    def decode(self, out, ranked: bool = False) -> list[tuple[Tensor, Tensor, Tensor]]:
        """The stored rule applied to the network's raw outputs `out` (also an exported CenterNet's maps).
        `ranked`: the detections mAP scores instead of the served ones, every one above the rule's
        map_score_threshold up to COCO's `MAP_MAX_DETECTIONS` per image (the served cap does not apply)."""
        r = self.rule
        threshold, cap = (r.map_score_threshold, MAP_MAX_DETECTIONS) if ranked else (r.score_threshold, r.max_detections)
        return self.net.detect(out, threshold, r.iou_threshold, cap, r.class_agnostic_nms)


def build(arch: str, class_names: list[str], image_shape, mean, std, rule: DetectionConfig) -> Detector:
    h, _, c = image_shape
    net = create_model(arch, in_channels=c, num_classes=len(class_names), image_size=h)
    return Detector(net, list(mean), list(std), rule)


def save(path: Path, model: Detector, arch: str, class_names: list[str], image_shape, **extra) -> None:
    payload = {
        "arch": arch,
        "task": "detection",
        "class_names": list(class_names),
        "image_shape": list(image_shape),
        "rule": model.rule.model_dump(),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        **extra,
    }
    model_file.save(path, payload)


def load(path: Path | str, device: torch.device | str = "cpu") -> tuple[Detector, dict]:
    """Rebuild a saved detector in eval mode; also returns the saved metadata."""
    info = model_file.read(path, "detection")
    state = info.pop("state_dict")
    rule = DetectionConfig.model_validate(info["rule"])
    model = build(info["arch"], info["class_names"], tuple(info["image_shape"]), state["mean"].flatten(),
                  state["std"].flatten(), rule)
    model.load_state_dict(state)
    return model.to(device).eval(), info


@torch.no_grad()
def predict(model: Detector, images_nhwc, device: torch.device | str = "cpu", batch_size: int = 256,
            ranked: bool = False) -> list[Detection]:
    """Detections for a uint8 N x H x W x C array, in batches (the stored rule; `ranked`: those mAP
    scores, as `Detector.decode`)."""
    model.eval()
    out: list[Detection] = []
    for start in range(0, len(images_nhwc), batch_size):
        chunk = torch.as_tensor(np.asarray(images_nhwc[start : start + batch_size]).copy()).to(device).permute(0, 3, 1, 2)
        out += as_arrays(model.detect(chunk, ranked))
    return out


def as_arrays(detections: list[tuple[Tensor, Tensor, Tensor]]) -> list[Detection]:
    """(boxes, scores, labels) tensors per image → `Detection` dicts of numpy arrays."""
    return [{"boxes": boxes.float().cpu().numpy(), "scores": scores.float().cpu().numpy(),
             "labels": labels.cpu().numpy().astype(np.int64)} for boxes, scores, labels in detections]


class Detect(nn.Module):
    """The served predictor as a module (for latency timing): images in, decoded detections out."""

    def __init__(self, model: Detector):
        super().__init__()
        self.model = model

    def forward(self, x: Tensor):
        return self.model.detect(x)
