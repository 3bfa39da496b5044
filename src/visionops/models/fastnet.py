"""airbench94's network (Keller Jordan), with its data-dependent whitening stem.

A frozen 2x2 whitening conv (its filters are the ZCA-style eigenvectors of the training images'
patch covariance, set by the trainer through `init_from_data`), then three groups of
conv-pool-BN-GELU-conv-BN-GELU, a global max-pool and a bias-free linear head whose logits are
scaled down. BatchNorm scales are frozen at 1; only their biases train.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from visionops.models.registry import register_model


class Whitening(nn.Conv2d):
    """A k x k 'valid' conv whose frozen filters whiten the input patches (2 * C * k * k outputs).

    Until `init_from_data` sees training inputs its filters are a random projection.
    """

    def __init__(self, in_channels: int, kernel_size: int = 2, eps: float = 5e-4):
        super().__init__(in_channels, 2 * in_channels * kernel_size**2, kernel_size, padding=0, bias=True)
        self.eps = eps
        self.weight.requires_grad_(False)
        nn.init.zeros_(self.bias)

    @torch.no_grad()
    def init_from_data(self, inputs: Tensor) -> None:
        """Set the filters to +/- the patch covariance's eigenvectors over sqrt(eigenvalue + eps)."""
        c, (h, w) = inputs.shape[1], self.kernel_size
        patches = inputs.float().unfold(2, h, 1).unfold(3, w, 1).transpose(1, 3).reshape(-1, c * h * w)
        cov = patches.T @ patches / len(patches)
        eigenvalues, eigenvectors = torch.linalg.eigh(cov.double())
        filters = (eigenvectors.T / torch.sqrt(eigenvalues.clamp_min(0) + self.eps)[:, None]).flip(0)
        filters = filters.reshape(c * h * w, c, h, w).to(self.weight.dtype)
        self.weight.copy_(torch.cat([filters, -filters]))


class Conv(nn.Conv2d):
    """A bias-free 'same' conv initialised as identity on its first in_channels filters (an implicit residual)."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__(in_channels, out_channels, 3, padding="same", bias=False)

    def reset_parameters(self):
        super().reset_parameters()
        w = self.weight.data
        nn.init.dirac_(w[: w.size(1)])


class BatchNorm(nn.BatchNorm2d):
    """BatchNorm with a frozen unit scale (only the bias trains), as in airbench."""

    def __init__(self, num_features: int, momentum: float):
        super().__init__(num_features, eps=1e-12, momentum=momentum)
        self.weight.requires_grad_(False)


class ConvGroup(nn.Sequential):
    def __init__(self, in_channels: int, out_channels: int, bn_momentum: float):
        super().__init__(
            Conv(in_channels, out_channels),
            nn.MaxPool2d(2),
            BatchNorm(out_channels, bn_momentum),
            nn.GELU(),
            Conv(out_channels, out_channels),
            BatchNorm(out_channels, bn_momentum),
            nn.GELU(),
        )


class Scale(nn.Module):
    def __init__(self, factor: float):
        super().__init__()
        self.factor = factor

    def forward(self, x: Tensor) -> Tensor:
        return x * self.factor


def _fastnet(in_channels: int, num_classes: int, widths: tuple[int, int, int], bn_momentum: float = 0.4, scaling_factor: float = 1 / 9) -> nn.Sequential:
    stem = Whitening(in_channels)
    groups, width = [], stem.out_channels
    for out in widths:
        groups.append(ConvGroup(width, out, bn_momentum))
        width = out
    return nn.Sequential(
        stem,
        nn.GELU(),
        *groups,
        nn.AdaptiveMaxPool2d(1),
        nn.Flatten(),
        nn.Linear(width, num_classes, bias=False),
        Scale(scaling_factor),
    )


@register_model
def fastnet(*, in_channels: int, num_classes: int, image_size: int, widths: tuple[int, int, int] = (64, 256, 256)) -> nn.Module:
    """airbench94's net (1.97M parameters on CIFAR-10); bn_momentum is PyTorch's (airbench's decay 0.6)."""
    return _fastnet(in_channels, num_classes, widths)


@register_model
def fastnet_tiny(*, in_channels: int, num_classes: int, image_size: int) -> nn.Module:
    """fastnet at widths (24, 48, 96): a distillation student with 1/12 of fastnet's parameters."""
    return _fastnet(in_channels, num_classes, (24, 48, 96))
