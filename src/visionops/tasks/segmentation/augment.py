"""Mask-aware augmentation, batched on the training device: each image of a batch gets its own random
horizontal flip, scale jitter and shift by up to `augment.translate` of the side (one affine warp, the
mask warped with nearest-neighbour sampling by the same matrix) and brightness/contrast jitter. The warp
also resamples the batch to a smaller `size` when one is set (progressive resizing: `training.progressive`).

Written with `affine_grid`/`grid_sample` rather than `torchvision.transforms.v2` because v2 draws one
set of random parameters per call: per-image parameters would mean a Python loop over the batch.
Pixels the warp brings in from outside the image are marked IGNORE in the mask.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from visionops.config import AugmentConfig
from visionops.tasks.segmentation.segmenter import IGNORE


def _uniform(n: int, lo: float, hi: float, gen: torch.Generator, device: torch.device) -> Tensor:
    return torch.rand(n, generator=gen, device=gen.device).to(device) * (hi - lo) + lo


class MaskAugment(nn.Module):
    def __init__(self, hflip: bool = False, scale_jitter: float = 0.0, translate: float = 0.0, brightness: float = 0.0):
        super().__init__()
        self.hflip, self.scale_jitter, self.translate, self.brightness = hflip, scale_jitter, translate, brightness
        self.size: tuple[int, int] | None = None  # output (height, width); None: the input's

    @classmethod
    def from_config(cls, cfg: AugmentConfig) -> MaskAugment:
        return cls(cfg.hflip, cfg.scale_jitter, cfg.translate, cfg.brightness)

    @property
    def warps(self) -> bool:
        return self.hflip or self.scale_jitter > 0 or self.translate > 0

    def forward(self, x: Tensor, masks: Tensor, gen: torch.Generator) -> tuple[Tensor, Tensor]:
        """x: float N x C x H x W in [0, 1]; masks: uint8 N x H x W."""
        n, c, h, w = x.shape
        dev = x.device
        out_h, out_w = self.size or (h, w)
        if self.warps or (out_h, out_w) != (h, w):
            scale = _uniform(n, 1 - self.scale_jitter, 1 + self.scale_jitter, gen, dev)
            flip = torch.ones(n, device=dev)
            if self.hflip:
                flip = torch.where(torch.rand(n, generator=gen, device=gen.device).to(dev) < 0.5, -1.0, 1.0)
            sx, sy = self.translate * w, self.translate * h  # the largest shift in pixels
            tx = _uniform(n, -sx, sx, gen, dev) * 2 / w
            ty = _uniform(n, -sy, sy, gen, dev) * 2 / h
            theta = torch.zeros(n, 2, 3, device=dev)
            theta[:, 0, 0], theta[:, 1, 1] = flip / scale, 1 / scale  # output → input coordinates
            theta[:, 0, 2], theta[:, 1, 2] = tx, ty
            grid = F.affine_grid(theta, [n, c, out_h, out_w], align_corners=False)
            x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
            shifted = masks.float().add(1).unsqueeze(1)  # 0 after sampling = outside the image
            warped = F.grid_sample(shifted, grid, mode="nearest", padding_mode="zeros", align_corners=False)[:, 0]
            masks = torch.where(warped == 0, IGNORE, warped - 1).to(torch.uint8)
        if self.brightness > 0:
            b = self.brightness
            contrast = _uniform(n, 1 - b, 1 + b, gen, dev).view(n, 1, 1, 1)
            offset = _uniform(n, -b / 2, b / 2, gen, dev).view(n, 1, 1, 1)
            mean = x.mean((1, 2, 3), keepdim=True)
            x = ((x - mean) * contrast + mean + offset).clamp_(0, 1)
        return x, masks
