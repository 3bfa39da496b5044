"""CIFAR-style ResNets (He et al. 2016): 3x3 stem, no max-pool, stages of basic residual blocks.

`BasicBlock` is torchvision's (same layers, names and initialisation order, so the state dicts and
seeded weights are identical), defined here so that training does not import torchvision (~1.5 s).
Downsampling shortcuts are 1x1 conv + BN projections (option B), as in torchvision.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from visionops.models.registry import register_model


def conv3x3(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)


def conv1x1(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    """Two 3x3 conv + BN layers and a residual connection (torchvision's `BasicBlock`)."""

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        identity = x if self.downsample is None else self.downsample(x)
        out = out + identity  # not in place: Opacus (DP-SGD) hooks the norm layer that made `out`
        return self.relu(out)


class CifarResNet(nn.Module):
    """A 3x3 conv stem then one stage of BasicBlocks per width; stages after the first halve the resolution."""

    def __init__(self, in_channels: int, num_classes: int, widths: Sequence[int], depths: Sequence[int]):
        super().__init__()
        if len(widths) != len(depths):
            raise ValueError(f"widths {widths} and depths {depths} differ in length")
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=False),
            nn.BatchNorm2d(widths[0]),
            nn.ReLU(inplace=True),
        )
        stages, inplanes = [], widths[0]
        for i, (width, depth) in enumerate(zip(widths, depths)):
            stride = 1 if i == 0 else 2
            downsample = None
            if stride != 1 or inplanes != width:
                downsample = nn.Sequential(conv1x1(inplanes, width, stride), nn.BatchNorm2d(width))
            blocks = [BasicBlock(inplanes, width, stride, downsample)]
            blocks += [BasicBlock(width, width) for _ in range(depth - 1)]
            stages.append(nn.Sequential(*blocks))
            inplanes = width
        self.stages = nn.Sequential(*stages)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(inplanes, num_classes))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x):
        return self.head(self.stages(self.stem(x)))


@register_model
def resnet20(*, in_channels: int, num_classes: int, image_size: int) -> nn.Module:
    """ResNet-20 for CIFAR: widths 16/32/64, 3 blocks per stage (~0.27M parameters)."""
    return CifarResNet(in_channels, num_classes, (16, 32, 64), (3, 3, 3))


@register_model
def resnet8(*, in_channels: int, num_classes: int, image_size: int) -> nn.Module:
    """ResNet-8 for CIFAR: widths 16/32/64, 1 block per stage (~78k parameters); a distillation student."""
    return CifarResNet(in_channels, num_classes, (16, 32, 64), (1, 1, 1))


@register_model
def resnet(*, in_channels: int, num_classes: int, image_size: int) -> nn.Module:
    """Alias of resnet20."""
    return resnet20(in_channels=in_channels, num_classes=num_classes, image_size=image_size)


@register_model
def resnet18(*, in_channels: int, num_classes: int, image_size: int) -> nn.Module:
    """ResNet-18, CIFAR variant: 3x3 stem, no max-pool, widths 64/128/256/512, 2 blocks per stage."""
    return CifarResNet(in_channels, num_classes, (64, 128, 256, 512), (2, 2, 2, 2))


@register_model
def slim_resnet(
    *,
    in_channels: int,
    num_classes: int,
    image_size: int,
    widths: Sequence[int] = (8, 16, 32),
    depths: Sequence[int] = (2, 2, 2),
) -> nn.Module:
    """A narrow ResNet (ResNet-14 at half the ResNet-20 width by default), meant as a distillation student."""
    return CifarResNet(in_channels, num_classes, widths, depths)
