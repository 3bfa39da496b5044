"""Object detectors, built by name: `create_model("centernet", in_channels=1, num_classes=10, image_size=64)`.

Every detector takes normalised float images N x C x H x W and offers the same three calls:
`forward(x)` (raw outputs), `loss(x, out, boxes, labels)` (boxes N x M x 4 xyxy pixels, labels N x M
class 0..K-1 with -1 padding) and `detect(x, out, score_threshold, iou_threshold, max_detections,
class_agnostic)` → per image (boxes, scores, labels), ending in `torchvision.ops.batched_nms` (per class,
or over all classes at once when `class_agnostic`).

- `centernet` / `centernet_tiny`: a compact anchor-free single-scale detector in the style of CenterNet
  (Zhou et al. 2019, "Objects as Points"): a small CNN to stride 4 with one upsampling skip, a class
  heatmap (focal loss on Gaussian peaks), box sizes and centre offsets. Its raw output is one dense
  tensor, so it exports to ONNX and distils per location. Written here because torchvision has no
  detector small enough to train in seconds on a CPU.
- `fasterrcnn_mobilenet_v3_large_320_fpn`, `ssdlite320_mobilenet_v3_large`: torchvision's builders
  (weights=None, weights_backbone=None); torchvision reserves label 0 for background, so the wrapper
  shifts class ids by one on the way in and out.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from visionops.models.layers import conv_bn_relu as _conv
from visionops.models.narrow import ChannelGroup, conv_bn_groups
from visionops.models.registry import register_model

Detections = list[tuple[Tensor, Tensor, Tensor]]  # per image: boxes K x 4 xyxy, scores K, labels K


def _nms(boxes: Tensor, scores: Tensor, labels: Tensor, score_threshold: float, iou_threshold: float,
         max_detections: int, class_agnostic: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    from torchvision.ops import (
        batched_nms,  # (torchvision is imported only when a detector predicts)
    )

    keep = scores >= score_threshold
    boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
    groups = torch.zeros_like(labels) if class_agnostic else labels  # agnostic: one box per place, whatever its class
    keep = batched_nms(boxes, scores, groups, iou_threshold)[:max_detections]
    return boxes[keep], scores[keep], labels[keep]


class CenterNet(nn.Module):
    """Stride-4 heatmap + size + offset detector; `forward` returns N x (K + 4) x H/4 x W/4 raw maps:
    K class logits, then box width and height in pixels / stride (log scale), then the centre offset."""

    stride = 4

    def __init__(self, in_channels: int, num_classes: int, width: int = 32):
        super().__init__()
        w = width
        self.num_classes = num_classes
        self.stem = nn.Sequential(_conv(in_channels, w, 2), _conv(w, w))  # /2
        self.down4 = nn.Sequential(_conv(w, 2 * w, 2), _conv(2 * w, 2 * w))  # /4
        self.down8 = nn.Sequential(_conv(2 * w, 4 * w, 2), _conv(4 * w, 4 * w), _conv(4 * w, 4 * w))  # /8
        self.lateral = nn.Conv2d(4 * w, 2 * w, 1)
        self.fuse = _conv(2 * w, 2 * w)
        self.head = nn.Sequential(_conv(2 * w, 2 * w), nn.Conv2d(2 * w, num_classes + 4, 1))
        with torch.no_grad():  # CenterNet's prior: heatmap logits start at sigmoid = 0.01
            self.head[-1].bias[:num_classes].fill_(-4.6)

    def forward(self, x: Tensor) -> Tensor:
        c4 = self.down4(self.stem(x))
        c8 = self.down8(c4)
        p4 = self.fuse(c4 + F.interpolate(self.lateral(c8), size=c4.shape[-2:], mode="nearest"))
        return self.head(p4)

    def channel_groups(self) -> list[ChannelGroup]:
        """The channel sets a narrower CenterNet keeps (`models.narrow`): each block's outputs with the inputs
        they feed. The stride-4 features and the lateral branch are added, so they share one set."""
        feeds = {  # block -> the (key, dim) its output channels index besides its own conv and batch norm
            "stem.0": [("stem.1.0.weight", 1)],
            "stem.1": [("down4.0.0.weight", 1)],
            "down4.0": [("down4.1.0.weight", 1)],
            "down4.1": [("down8.0.0.weight", 1), ("fuse.0.weight", 1), ("lateral.weight", 0), ("lateral.bias", 0)],
            "down8.0": [("down8.1.0.weight", 1)],
            "down8.1": [("down8.2.0.weight", 1)],
            "down8.2": [("lateral.weight", 1)],
            "fuse": [("head.0.0.weight", 1)],
            "head.0": [("head.1.weight", 1)],
        }
        return conv_bn_groups(feeds)

    def targets(self, out: Tensor, boxes: Tensor, labels: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Gaussian heatmap N x K x h x w, and per object its cell index, size/offset target and validity."""
        h, w = out.shape[-2:]
        valid = labels >= 0
        b = boxes / self.stride
        centre = (b[..., :2] + b[..., 2:]) / 2
        size = (b[..., 2:] - b[..., :2]).clamp_min(1e-3)
        cell = centre.floor().clamp_min(0)
        cell = torch.minimum(cell, torch.tensor([w - 1, h - 1], device=out.device, dtype=cell.dtype))
        sigma = (size / 6).clamp_min(0.5)  # per axis, as TTFNet's elliptical Gaussians
        ys = torch.arange(h, device=out.device, dtype=out.dtype).view(1, 1, h, 1)
        xs = torch.arange(w, device=out.device, dtype=out.dtype).view(1, 1, 1, w)
        gx = ((xs - cell[..., 0, None, None]) / sigma[..., 0, None, None]) ** 2
        gy = ((ys - cell[..., 1, None, None]) / sigma[..., 1, None, None]) ** 2
        g = torch.exp(-(gx + gy) / 2) * valid[..., None, None]  # N x M x h x w
        onehot = F.one_hot(labels.clamp_min(0), self.num_classes).to(out.dtype) * valid[..., None]  # N x M x K
        heat = (onehot[..., None, None] * g[:, :, None]).amax(1)  # N x K x h x w
        index = (cell[..., 1] * w + cell[..., 0]).long()  # N x M
        reg = torch.cat([size.log(), centre - cell], -1)  # N x M x 4
        return heat, index, reg, valid

    def loss(self, x: Tensor, out: Tensor, boxes: Tensor, labels: Tensor) -> Tensor:
        out = out.float()
        heat, index, reg, valid = self.targets(out, boxes, labels)
        k = self.num_classes
        logits = out[:, :k]
        pos = heat.eq(1).float()  # exactly 1 at each object's cell
        p = logits.sigmoid().clamp(1e-4, 1 - 1e-4)
        # CenterNet's penalty-reduced focal loss (alpha 2, beta 4)
        pos_loss = -(F.logsigmoid(logits) * (1 - p) ** 2 * pos).sum()
        neg_loss = -(F.logsigmoid(-logits) * p**2 * (1 - heat) ** 4 * (1 - pos)).sum()
        n_pos = valid.sum().clamp_min(1)
        pred = out[:, k:].flatten(2).gather(2, index[:, None].expand(-1, 4, -1)).transpose(1, 2)  # N x M x 4
        reg_loss = (F.l1_loss(pred, reg, reduction="none") * valid[..., None]).sum() / n_pos
        return (pos_loss + neg_loss) / n_pos + reg_loss

    @torch.no_grad()
    def detect(self, out: Tensor, score_threshold: float, iou_threshold: float, max_detections: int,
               class_agnostic: bool = False) -> Detections:
        return decode_centernet(out, self.num_classes, self.stride, score_threshold, iou_threshold, max_detections,
                                class_agnostic=class_agnostic)


def decode_centernet(out: Tensor, num_classes: int, stride: int, score_threshold: float, iou_threshold: float,
                     max_detections: int, candidates: int = 100, class_agnostic: bool = False) -> Detections:
    """Peaks of the heatmap (3x3 max-pool) → boxes in input pixels → batched NMS per image."""
    out = out.float()
    n, _, h, w = out.shape
    heat = out[:, :num_classes].sigmoid()
    peak = heat * (F.max_pool2d(heat, 3, 1, 1) == heat)
    scores, flat = peak.flatten(1).topk(min(candidates, num_classes * h * w), dim=1)
    labels, cell = flat // (h * w), flat % (h * w)
    reg = out[:, num_classes:].flatten(2).gather(2, cell[:, None].expand(-1, 4, -1))  # N x 4 x C
    cx = (cell % w).float() + reg[:, 2]
    cy = (cell // w).float() + reg[:, 3]
    bw, bh = reg[:, 0].exp(), reg[:, 1].exp()
    boxes = torch.stack([cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2], -1) * stride
    boxes = boxes.clamp(0, max(h, w) * stride)
    return [_nms(boxes[i], scores[i], labels[i], score_threshold, iou_threshold, max_detections, class_agnostic)
            for i in range(n)]


class TorchvisionDetector(nn.Module):
    """A torchvision detector behind the common interface. Its loss needs the targets, so in training
    `forward` passes the images through and `loss` runs the network; class ids shift by one because
    torchvision's label 0 is the background."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x: Tensor):
        return x if self.training else self.net(list(x))

    def loss(self, x: Tensor, out, boxes: Tensor, labels: Tensor) -> Tensor:
        targets = [{"boxes": b[lab >= 0], "labels": lab[lab >= 0] + 1} for b, lab in zip(boxes, labels)]
        return sum(self.net(list(x), targets).values())

    @torch.no_grad()
    def detect(self, out, score_threshold: float, iou_threshold: float, max_detections: int,
               class_agnostic: bool = False) -> Detections:
        return [_nms(o["boxes"], o["scores"], o["labels"] - 1, score_threshold, iou_threshold, max_detections,
                     class_agnostic) for o in out]


@register_model(task="detection")
def centernet(in_channels: int, num_classes: int, image_size: int, **_) -> nn.Module:
    """The default teacher: CenterNet-style, width 32 (about 0.4 M parameters)."""
    return CenterNet(in_channels, num_classes, width=32)


@register_model(task="detection")
def centernet_tiny(in_channels: int, num_classes: int, image_size: int, **_) -> nn.Module:
    """The default student: the same detector at width 16 (about a quarter of the parameters)."""
    return CenterNet(in_channels, num_classes, width=16)


def _torchvision_size(image_size: int) -> dict:
    return {"min_size": image_size, "max_size": image_size}


@register_model(task="detection")
def fasterrcnn_mobilenet_v3_large_320_fpn(in_channels: int, num_classes: int, image_size: int, **_) -> nn.Module:
    from torchvision.models.detection import (
        fasterrcnn_mobilenet_v3_large_320_fpn as build,
    )

    # inputs arrive normalised; the transform's own normalisation is made the identity
    net = build(weights=None, weights_backbone=None, num_classes=num_classes + 1, image_mean=[0.0] * 3,
                image_std=[1.0] * 3, **_torchvision_size(max(image_size, 64)))
    return TorchvisionDetector(_three_channels(net, in_channels))


@register_model(task="detection")
def ssdlite320_mobilenet_v3_large(in_channels: int, num_classes: int, image_size: int, **_) -> nn.Module:
    from torchvision.models.detection import ssdlite320_mobilenet_v3_large as build

    net = build(weights=None, weights_backbone=None, num_classes=num_classes + 1, image_mean=[0.0] * 3,
                image_std=[1.0] * 3)
    return TorchvisionDetector(_three_channels(net, in_channels))


def _three_channels(net: nn.Module, in_channels: int) -> nn.Module:
    """torchvision's backbones take RGB: a greyscale input is repeated to three channels first."""
    if in_channels == 3:
        return net
    transform = net.transform
    normalize = transform.normalize

    def normalize_rgb(image: Tensor) -> Tensor:
        return normalize(image.expand(3, -1, -1) if image.shape[0] == 1 else image)

    transform.normalize = normalize_rgb
    return net
