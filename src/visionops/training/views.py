"""The strong views self-supervised pretraining compares (SimSiam's, after SimCLR; Chen & He 2021, sec. 4 and
appendix): random resized crop, horizontal flip, colour jitter and greyscale (RGB), Gaussian blur.

Batched on the device with `affine_grid` / `grid_sample` and per-image parameters, as the tasks' augmentations
are (`torchvision.transforms.v2` draws one set of parameters per call, the same for every image of a batch);
every draw comes from the caller's generator, so the same seed gives the same views. Colour jitter changes
brightness, contrast and saturation in that order (no hue shift). Images are floats in [0, 1].
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from visionops.config import PretrainConfig

LUMA = (0.299, 0.587, 0.114)  # ITU-R 601, as torchvision's rgb_to_grayscale


def _uniform(n: int, lo: float, hi: float, gen: torch.Generator, device: torch.device) -> Tensor:
    return (lo + (hi - lo) * torch.rand(n, generator=gen, device=gen.device)).to(device)


def _chance(n: int, p: float, gen: torch.Generator, device: torch.device) -> Tensor:
    return _uniform(n, 0.0, 1.0, gen, device) < p


def _grey(x: Tensor) -> Tensor:
    """(N, 1, H, W) luminance of RGB (or the channel itself)."""
    if x.shape[1] == 1:
        return x
    return sum(w * x[:, i : i + 1] for i, w in enumerate(LUMA))


def resized_crop(x: Tensor, scale: Tensor, log_ratio: Tensor, centre: Tensor, flip: Tensor) -> Tensor:
    """Crop image i to `scale[i]` of its area at aspect ratio exp(log_ratio[i]) (each side at most the whole),
    centred at `centre[i]` (in [-1, 1] of the room left), mirrored where `flip`, resized back to H x W."""
    ratio = log_ratio.exp()
    sw, sh = (scale * ratio).sqrt().clamp(max=1), (scale / ratio).sqrt().clamp(max=1)
    cx, cy = centre[:, 0] * (1 - sw), centre[:, 1] * (1 - sh)
    sx = torch.where(flip, -sw, sw)
    zero = torch.zeros_like(sw)
    theta = torch.stack([torch.stack([sx, zero, cx], 1), torch.stack([zero, sh, cy], 1)], 1)
    grid = F.affine_grid(theta.to(x.dtype), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def jitter(x: Tensor, brightness: Tensor, contrast: Tensor, saturation: Tensor) -> Tensor:
    """Per-image brightness, contrast (about the image's mean luminance) and saturation (RGB) factors."""
    f = lambda v: v.view(-1, 1, 1, 1)  # noqa: E731
    x = (x * f(brightness)).clamp(0, 1)
    mean = _grey(x).mean((1, 2, 3), keepdim=True)
    x = ((x - mean) * f(contrast) + mean).clamp(0, 1)
    if x.shape[1] == 3:
        grey = _grey(x)
        x = ((x - grey) * f(saturation) + grey).clamp(0, 1)
    return x


def blur(x: Tensor, sigma: Tensor) -> Tensor:
    """Image i blurred by a Gaussian of std `sigma[i]` pixels (separable, reflect-padded, 3 sigma wide at most)."""
    n, c, h, w = x.shape
    radius = max(1, min(math.ceil(3 * float(sigma.max())), (min(h, w) - 1) // 2))
    offsets = torch.arange(-radius, radius + 1, device=x.device, dtype=x.dtype)
    kernel = torch.exp(-(offsets[None] ** 2) / (2 * sigma[:, None].to(x.dtype) ** 2))
    kernel = (kernel / kernel.sum(1, keepdim=True)).repeat_interleave(c, 0)  # (N * C, K)
    flat = F.pad(x.reshape(1, n * c, h, w), (radius,) * 4, mode="reflect")
    flat = F.conv2d(flat, kernel[:, None, :, None], groups=n * c)
    flat = F.conv2d(flat, kernel[:, None, None, :], groups=n * c)
    return flat.reshape(n, c, h, w)


class StrongViews:
    """`views(x, gen)`: one random view of every image of the float (N, C, H, W) batch `x`; call it twice for
    SimSiam's pair. Strengths from `pretrain` (crop_min_scale, hflip, jitter, jitter_prob, grey_prob, blur_prob)."""

    def __init__(self, cfg: PretrainConfig):
        self.cfg = cfg

    def __call__(self, x: Tensor, gen: torch.Generator) -> Tensor:
        cfg, n, dev = self.cfg, len(x), x.device
        centre = torch.stack([_uniform(n, -1.0, 1.0, gen, dev), _uniform(n, -1.0, 1.0, gen, dev)], 1)
        flip = _chance(n, 0.5 if cfg.hflip else 0.0, gen, dev)
        x = resized_crop(x, _uniform(n, cfg.crop_min_scale, 1.0, gen, dev),
                         _uniform(n, math.log(3 / 4), math.log(4 / 3), gen, dev), centre, flip)
        if cfg.jitter > 0 and cfg.jitter_prob > 0:
            lo, hi = 1 - cfg.jitter, 1 + cfg.jitter
            on = _chance(n, cfg.jitter_prob, gen, dev)
            x = torch.where(on.view(-1, 1, 1, 1), jitter(x, *(_uniform(n, lo, hi, gen, dev) for _ in range(3))), x)
        if x.shape[1] == 3 and cfg.grey_prob > 0:
            x = torch.where(_chance(n, cfg.grey_prob, gen, dev).view(-1, 1, 1, 1), _grey(x).expand_as(x), x)
        if cfg.blur_prob > 0:
            side = min(x.shape[-2:]) / 224  # SimCLR's sigma in [0.1, 2] is for 224-pixel images
            sigma = _uniform(n, 0.1 * side, 2.0 * side, gen, dev).clamp(min=1e-3)
            x = torch.where(_chance(n, cfg.blur_prob, gen, dev).view(-1, 1, 1, 1), blur(x, sigma), x)
        return x
