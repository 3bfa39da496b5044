"""Semantic segmentation networks: (N, C, H, W) normalised floats → (N, num_classes, H, W) per-pixel logits.

`unet` (the fast default teacher) and `unet_small` (the default student) are light U-Nets (Ronneberger et
al. 2015: an encoder, and a decoder that upsamples and joins the encoder's features of the same scale);
written here because torchvision has no U-Net. `lraspp_mobilenet_v3_large`
and `deeplabv3_mobilenet_v3_large` are torchvision's builders (never with pretrained weights), wrapped
to return the "out" logits as a plain tensor.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from visionops.models.layers import conv_bn_relu as _conv
from visionops.models.narrow import ChannelGroup, conv_bn_groups
from visionops.models.registry import register_model


class UNet(nn.Module):
    """A light U-Net: an encoder to stride 8, a decoder back to stride 4 that adds the encoder's stride-4
    features, then a full-resolution conv that joins the upsampled decoder with the input image itself. The
    stride-4 decoder also scores the classes itself (`coarse`, a 1x1 conv), and the full-resolution head
    adds its logits to those scores upsampled (FCN's summed score maps, Long et al. 2015): the classes then
    need not pass the head's few channels, and training no longer stalls for a seed-dependent number of
    epochs before it tells the digits apart.

    The coarse scales tell the digits apart (most of the depth is at stride 4, where a 16-28 pixel digit is
    4-7 cells, about its 8 x 8 glyph's own resolution); the input image gives the full-resolution conv the
    edges, so no decoder level runs at stride 2 or 1, where a CPU spends most of a U-Net's time. Input sides
    need not be multiples of 8.
    """

    def __init__(self, in_channels: int, num_classes: int, width: int = 32, head_width: int = 8):
        super().__init__()
        w = width
        self.stem = _conv(in_channels, w, 2)  # /2
        self.down4 = nn.Sequential(_conv(w, 2 * w, 2), _conv(2 * w, 2 * w), _conv(2 * w, 2 * w), _conv(2 * w, 2 * w))  # /4
        self.down8 = nn.Sequential(_conv(2 * w, 4 * w, 2), _conv(4 * w, 4 * w))  # /8
        self.lateral = nn.Conv2d(4 * w, 2 * w, 1)
        self.up4 = _conv(2 * w, 2 * w)
        self.project = nn.Conv2d(2 * w, head_width, 1)
        self.full = _conv(head_width + in_channels, head_width)
        self.head = nn.Conv2d(head_width, num_classes, 1)
        self.coarse = nn.Conv2d(2 * w, num_classes, 1)

    def forward(self, x: Tensor) -> Tensor:
        c4 = self.down4(self.stem(x))
        c8 = self.down8(c4)
        p4 = self.up4(c4 + F.interpolate(self.lateral(c8), size=c4.shape[-2:], mode="bilinear", align_corners=False))
        p1 = F.interpolate(self.project(p4), size=x.shape[-2:], mode="bilinear", align_corners=False)
        coarse = F.interpolate(self.coarse(p4), size=x.shape[-2:], mode="bilinear", align_corners=False)
        return self.head(self.full(torch.cat([p1, x], 1))) + coarse

    def channel_groups(self) -> list[ChannelGroup]:
        """The channel sets a narrower UNet keeps (`models.narrow`): each block's outputs with the inputs they
        feed. The stride-4 features and the lateral branch are added, so they share one set; the head keeps its width."""
        feeds = {  # block -> the (key, dim) its output channels index besides its own conv and batch norm
            "stem": [("down4.0.0.weight", 1)],
            "down4.0": [("down4.1.0.weight", 1)],
            "down4.1": [("down4.2.0.weight", 1)],
            "down4.2": [("down4.3.0.weight", 1)],
            "down4.3": [("down8.0.0.weight", 1), ("up4.0.weight", 1), ("lateral.weight", 0), ("lateral.bias", 0)],
            "down8.0": [("down8.1.0.weight", 1)],
            "down8.1": [("lateral.weight", 1)],
            "up4": [("project.weight", 1), ("coarse.weight", 1)],
        }
        return conv_bn_groups(feeds)


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


# Measured on the default canvases on 2 CPU cores (2026-12-02): the earlier U-Net (32/64/128 channels, decoder
# levels at strides 4 and 2, fp32) reached test mIoU 0.77 after 100 s of training on 1,500 canvases. This design
# (bf16, channels_last) reached 0.81-0.83 in about 60 s on 3,000 canvases, 0.853 in 72 s on 6,000 canvases
# (6 epochs) and 0.872 in 117 s (10 epochs). A stride-16 level, a dilated stride-8 conv, a full-resolution first
# conv, width 48 or a wider full-resolution head did not raise it beyond run-to-run noise (about 0.01); moving
# depth from stride 8 to stride 4 (this layout) gave 0.833 in one run on 3,000 canvases, against 0.812-0.826.
# Without `coarse` the preset's teacher reached test mIoU 0.8564 with train.seed 0 but 0.8098 and 0.8224 with seeds
# 1 and 2 (val mIoU stuck near 0.14 for 2-3 epochs); with it, 0.8577, 0.8602 and 0.8583 (2026-12-03).
@register_model(task="segmentation")
def unet(in_channels: int, num_classes: int, image_size: int, **_) -> nn.Module:
    """The default teacher: width 32 (398,830 parameters for 11 classes)."""
    return UNet(in_channels, num_classes, width=32)


@register_model(task="segmentation")
def unet_small(in_channels: int, num_classes: int, image_size: int, **_) -> nn.Module:
    """The default student: the same network at width 16 (100,990 parameters for 11 classes)."""
    return UNet(in_channels, num_classes, width=16)


@register_model(task="segmentation")
def lraspp_mobilenet_v3_large(in_channels: int, num_classes: int, image_size: int, **_) -> nn.Module:
    from torchvision.models.segmentation import lraspp_mobilenet_v3_large as build

    return TorchvisionSegmenter(build(weights=None, weights_backbone=None, num_classes=num_classes), in_channels)


@register_model(task="segmentation")
def deeplabv3_mobilenet_v3_large(in_channels: int, num_classes: int, image_size: int, **_) -> nn.Module:
    from torchvision.models.segmentation import deeplabv3_mobilenet_v3_large as build

    net = build(weights=None, weights_backbone=None, num_classes=num_classes, aux_loss=False)
    return TorchvisionSegmenter(net, in_channels)
