"""An airbench94-style network (Keller Jordan), without the whitening initialisation.

Stem conv (2x2, no padding), three groups of conv-pool-BN-GELU-conv-BN-GELU, a global
max-pool and a bias-free linear head whose logits are scaled down.
"""

from __future__ import annotations

import torch
from torch import nn

from visionops.models.registry import register_model


class Conv(nn.Conv2d):
    """A bias-free 'same' conv initialised as identity on its first in_channels filters (an implicit residual)."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__(in_channels, out_channels, 3, padding="same", bias=False)

    def reset_parameters(self):
        super().reset_parameters()
        w = self.weight.data
        nn.init.dirac_(w[: w.size(1)])


class ConvGroup(nn.Sequential):
    def __init__(self, in_channels: int, out_channels: int, bn_momentum: float):
        super().__init__(
            Conv(in_channels, out_channels),
            nn.MaxPool2d(2),
            nn.BatchNorm2d(out_channels, momentum=bn_momentum),
            nn.GELU(),
            Conv(out_channels, out_channels),
            nn.BatchNorm2d(out_channels, momentum=bn_momentum),
            nn.GELU(),
        )


class Scale(nn.Module):
    def __init__(self, factor: float):
        super().__init__()
        self.factor = factor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.factor


@register_model
def fastnet(
    *,
    in_channels: int,
    num_classes: int,
    image_size: int,
    widths: tuple[int, int, int] = (64, 256, 256),
    stem_width: int = 24,
    bn_momentum: float = 0.4,
    scaling_factor: float = 1 / 9,
) -> nn.Module:
    """airbench94's net; bn_momentum is PyTorch's (airbench's running-stat decay 0.6)."""
    groups, width = [], stem_width
    for out in widths:
        groups.append(ConvGroup(width, out, bn_momentum))
        width = out
    return nn.Sequential(
        nn.Conv2d(in_channels, stem_width, 2, padding=0),
        nn.GELU(),
        *groups,
        nn.AdaptiveMaxPool2d(1),
        nn.Flatten(),
        nn.Linear(width, num_classes, bias=False),
        Scale(scaling_factor),
    )
