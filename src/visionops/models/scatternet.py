"""ScatterNet (Tramèr & Boneh 2021, "Differentially Private Learning Needs Better Features"): a fixed
Scattering2D front-end (J=2, L=8: 81 coefficients per channel at a quarter of the side), group norm and a
linear head, for DP-SGD: the front has no weights to spend privacy budget on."""

from __future__ import annotations

from torch import Tensor, nn

from visionops.errors import InvalidInputError
from visionops.models.registry import register_model

J, L = 2, 8
COEFFICIENTS = 1 + J * L + L * L * J * (J - 1) // 2  # 81 per input channel


class Scattering(nn.Module):
    """kymatio's 2-D scattering transform: (N, C, H, W) -> (N, C * 81, H / 4, W / 4); no trainable weights."""

    def __init__(self, image_size: int):
        super().__init__()
        # `import kymatio.torch` also imports its 3-D module, which needs a scipy function (sph_harm) gone in 1.17
        from kymatio.scattering2d.frontend.torch_frontend import ScatteringTorch2D

        self.scattering = ScatteringTorch2D(J=J, shape=(image_size, image_size), L=L)

    def forward(self, x: Tensor) -> Tensor:
        out = self.scattering(x.float().contiguous())  # kymatio refuses strided inputs (NHWC images permuted)
        return out.flatten(1, 2)


class ScatterNet(nn.Module):
    """`front` (the scattering transform, frozen) then `head` (group norm without weights, a linear layer)."""

    def __init__(self, in_channels: int, num_classes: int, image_size: int):
        super().__init__()
        if image_size < 16 or image_size % 4:
            raise InvalidInputError(f"scatternet needs image_size >= 16 and a multiple of 4, got {image_size}")
        channels, side = in_channels * COEFFICIENTS, image_size // 4
        self.front = Scattering(image_size)
        self.head = nn.Sequential(
            nn.GroupNorm(9 * in_channels, channels, affine=False),  # 27 groups for RGB, as Tramèr & Boneh
            nn.Flatten(),
            nn.Linear(channels * side * side, num_classes),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.front(x))


@register_model
def scatternet(in_channels: int, num_classes: int, image_size: int, **_) -> nn.Module:
    return ScatterNet(in_channels, num_classes, image_size)
