"""LeNet-5 (LeCun et al. 1998) with ReLU and max-pooling."""

from __future__ import annotations

from torch import nn

from visionops.errors import InvalidInputError
from visionops.models.registry import register_model


def _pooled_size(image_size: int) -> int:
    """Spatial side after two (5x5 valid conv, 2x2 max-pool) stages."""
    return ((image_size - 4) // 2 - 4) // 2


class LeNet(nn.Module):
    def __init__(self, in_channels: int, num_classes: int, image_size: int):
        super().__init__()
        if image_size < 16:
            raise InvalidInputError(f"lenet needs image_size >= 16, got {image_size}")
        side = _pooled_size(image_size)
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 6, 5),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(6, 16, 5),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(16 * side * side, 120),
            nn.ReLU(inplace=True),
            nn.Linear(120, 84),
            nn.ReLU(inplace=True),
            nn.Linear(84, num_classes),
        )

    def forward(self, x):
        return self.classifier(self.features(x))


@register_model
def lenet(*, in_channels: int, num_classes: int, image_size: int) -> nn.Module:
    """LeNet-5: conv5-6, pool, conv5-16, pool, FC 120-84-num_classes."""
    return LeNet(in_channels, num_classes, image_size)
