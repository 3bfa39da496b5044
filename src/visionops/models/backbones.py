"""Classifiers whose encoders start other models (`train.init`; `models.encoders` names what moves).

- `centernet_backbone` / `unet_backbone`: the default detector's / segmenter's stride-8 encoder (`stem`,
  `down4`, `down8`, built by `CenterNet` / `UNet` themselves) with global pooling and a linear head: a
  classifier trained on labelled images whose encoder then starts a detector or a segmenter.
- `resnet18_tv` / `mobilenet_v3_large`: torchvision's networks (the layouts its ImageNet weights fit). A
  greyscale image is repeated to three channels, which is the same as summing the first conv's RGB weights,
  so ImageNet weights and the detectors' and segmenters' MobileNetV3 backbones fit either way.
"""

from __future__ import annotations

from torch import Tensor, nn

from visionops.models.detection import CenterNet
from visionops.models.registry import register_model
from visionops.models.segmentation import UNet


class Stride8Classifier(nn.Module):
    """`stem`, `down4` and `down8` of a CenterNet or U-Net (same names, same layers), then pooling and `head`."""

    def __init__(self, source: nn.Module, num_classes: int):
        super().__init__()
        self.stem, self.down4, self.down8 = source.stem, source.down4, source.down8
        width = self.down8[-1][0].out_channels
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, num_classes))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.down8(self.down4(self.stem(x))))


def _rgb(module: nn.Module, args: tuple) -> tuple:
    x = args[0]
    return (x.expand(-1, 3, -1, -1),) if x.shape[1] == 1 else args


def _rgb_input(net: nn.Module) -> nn.Module:
    net.register_forward_pre_hook(_rgb)
    return net


@register_model
def centernet_backbone(*, in_channels: int, num_classes: int, image_size: int) -> nn.Module:
    """`centernet`'s stride-8 encoder (width 32) with a linear head (0.43M parameters)."""
    return Stride8Classifier(CenterNet(in_channels, num_classes, width=32), num_classes)


@register_model
def unet_backbone(*, in_channels: int, num_classes: int, image_size: int) -> nn.Module:
    """`unet`'s stride-8 encoder (width 32) with a linear head (0.35M parameters)."""
    return Stride8Classifier(UNet(in_channels, num_classes, width=32), num_classes)


@register_model
def resnet18_tv(*, in_channels: int, num_classes: int, image_size: int) -> nn.Module:
    """torchvision's ResNet-18 (ImageNet layout: 7x7 stem and max-pool, 11.2M parameters for 3 classes)."""
    from torchvision.models import resnet18

    return _rgb_input(resnet18(weights=None, num_classes=num_classes))


@register_model
def mobilenet_v3_large(*, in_channels: int, num_classes: int, image_size: int) -> nn.Module:
    """torchvision's MobileNetV3-Large (4.2M parameters for 3 classes), the detectors' and segmenters' backbone."""
    from torchvision.models import mobilenet_v3_large as build

    return _rgb_input(build(weights=None, num_classes=num_classes))
