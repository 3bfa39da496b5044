"""Semantic segmentation networks: (N, C, H, W) normalised floats → (N, num_classes, H, W) per-pixel logits.

`unet` (the fast default teacher) and `unet_small` (the default student) are small U-Nets (Ronneberger et al.
2015: an encoder of conv blocks and max-pools, a decoder that upsamples and concatenates the encoder's
features of the same scale); written here because torchvision has no U-Net. `lraspp_mobilenet_v3_large`
and `deeplabv3_mobilenet_v3_large` are torchvision's builders (never with pretrained weights), wrapped
to return the "out" logits as a plain tensor.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from visionops.models.registry import register_model


def _block(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
        nn.Conv2d(cout, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
    )  # fmt: skip


class UNet(nn.Module):
    """A U-Net with `len(widths)` scales; input sides need not be multiples of 2**(scales - 1).

    With `stem_stride` 2 the encoder starts at half resolution (4x less compute, which is what lets it
    train in seconds on a CPU); the decoder's half-resolution features are then upsampled and joined
    with the input image itself for a last full-resolution conv (`head_width`), so that thin strokes
    keep their edges. `bottom_convs` convs at the coarsest scale give it the depth to tell digits apart.
    """

    def __init__(self, in_channels: int, num_classes: int, widths: tuple[int, ...], stem_stride: int = 1,
                 bottom_convs: int = 2, head_width: int = 16):
        super().__init__()
        self.down = nn.ModuleList()
        cin = in_channels
        for i, w in enumerate(widths):
            block = _block(cin, w, stem_stride if i == 0 else 1)
            if i == len(widths) - 1:
                block.extend(_block(w, w)[: 3 * (bottom_convs - 2)])
            self.down.append(block)
            cin = w
        self.up = nn.ModuleList(_block(widths[i + 1] + widths[i], widths[i]) for i in reversed(range(len(widths) - 1)))
        self.full = None
        if stem_stride > 1:
            self.full = nn.Sequential(
                nn.Conv2d(widths[0] + in_channels, head_width, 3, padding=1, bias=False), nn.BatchNorm2d(head_width),
                nn.ReLU(inplace=True),
            )  # fmt: skip
        self.head = nn.Conv2d(head_width if self.full is not None else widths[0], num_classes, 1)

    def forward(self, x: Tensor) -> Tensor:
        image, size = x, x.shape[-2:]
        skips = []
        for i, block in enumerate(self.down):
            x = block(x if i == 0 else F.max_pool2d(x, 2, ceil_mode=True))
            skips.append(x)
        skips.pop()
        for block in self.up:
            skip = skips.pop()
            x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)
            x = block(torch.cat([x, skip], 1))
        if self.full is not None:
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
            x = self.full(torch.cat([x, image], 1))
        return self.head(x)


class TorchvisionSegmenter(nn.Module):
    """A torchvision segmentation model whose dict output is reduced to its "out" logits."""

    def __init__(self, net: nn.Module, in_channels: int):
        super().__init__()
        self.in_channels = in_channels
        self.net = net

    def forward(self, x: Tensor) -> Tensor:
        if self.in_channels == 1:  # the MobileNetV3 backbone's stem takes 3 channels
            x = x.expand(-1, 3, -1, -1)
        return self.net(x)["out"]


# Wider low-resolution scales learn the digits' identity faster per second than a full-resolution level
# (measured on the default canvases: a full-resolution 8/16/32/64 U-Net stayed at test mIoU 0.11 after 6
# epochs, predicting only background vs ink; 16/48/96 at half resolution reached 0.63 in the same epochs).
@register_model(task="segmentation")
def unet(in_channels: int, num_classes: int, image_size: int, **_) -> nn.Module:
    return UNet(in_channels, num_classes, (32, 64, 128), stem_stride=2, bottom_convs=3)


@register_model(task="segmentation")
def unet_small(in_channels: int, num_classes: int, image_size: int, **_) -> nn.Module:
    return UNet(in_channels, num_classes, (12, 32, 64), stem_stride=2)


@register_model(task="segmentation")
def lraspp_mobilenet_v3_large(in_channels: int, num_classes: int, image_size: int, **_) -> nn.Module:
    from torchvision.models.segmentation import lraspp_mobilenet_v3_large as build

    return TorchvisionSegmenter(build(weights=None, weights_backbone=None, num_classes=num_classes), in_channels)


@register_model(task="segmentation")
def deeplabv3_mobilenet_v3_large(in_channels: int, num_classes: int, image_size: int, **_) -> nn.Module:
    from torchvision.models.segmentation import deeplabv3_mobilenet_v3_large as build

    net = build(weights=None, weights_backbone=None, num_classes=num_classes, aux_loss=False)
    return TorchvisionSegmenter(net, in_channels)
