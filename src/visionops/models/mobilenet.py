"""A tiny MobileNetV2 (Sandler et al. 2018) for 32x32 inputs, meant as a distillation student."""

from __future__ import annotations

from torch import nn

from visionops.models.registry import register_model

# (expand ratio t, output channels c, repeats n, first stride s), as in the paper's Table 2;
# only two stride-2 stages so 32x32 inputs end at 8x8.
_TINY_SETTINGS = ((1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 2, 2), (6, 64, 2, 2), (6, 96, 1, 1))


class MobileNetTiny(nn.Module):
    def __init__(self, in_channels: int, num_classes: int, stem_width: int = 16, last_width: int = 320):
        from torchvision.models.mobilenetv2 import InvertedResidual  # here: torchvision takes ~1.5 s to import
        from torchvision.ops.misc import Conv2dNormActivation

        super().__init__()
        layers: list[nn.Module] = [Conv2dNormActivation(in_channels, stem_width, activation_layer=nn.ReLU6)]
        width = stem_width
        for t, c, n, s in _TINY_SETTINGS:
            for i in range(n):
                layers.append(InvertedResidual(width, c, s if i == 0 else 1, t))
                width = c
        layers.append(Conv2dNormActivation(width, last_width, kernel_size=1, activation_layer=nn.ReLU6))
        self.features = nn.Sequential(*layers)
        self.head = nn.Sequential(
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(0.2), nn.Linear(last_width, num_classes)
        )
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")

    def forward(self, x):
        return self.head(self.features(x))


@register_model
def mobilenet_tiny(*, in_channels: int, num_classes: int, image_size: int) -> nn.Module:
    """MobileNetV2-style inverted residuals, widths 16-96, ~0.2M parameters."""
    return MobileNetTiny(in_channels, num_classes)
