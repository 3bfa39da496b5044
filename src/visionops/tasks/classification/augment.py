"""Batched, on-device training augmentation built from `AugmentConfig` (airbench style).

Every op transforms a whole (N, C, H, W) float batch at once, with per-sample randomness drawn
from an optional `torch.Generator`: the same seed gives the same batch. Images should be in
[0, 1] (RandAugment's colour ops clamp to it, cutout fills 0); normalise after augmenting.

The functional ops (`hflip`, `translate`, `rotate`, `cutout`) take their random parameters
explicitly, so they can be tested and reused; `BatchAugment` samples them.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from visionops.config import AugmentConfig


def hflip(images: Tensor, mask: Tensor) -> Tensor:
    """Mirror the samples where the (N,) bool `mask` is set."""
    return torch.where(mask.view(-1, 1, 1, 1), images.flip(-1), images)


def translate(images: Tensor, shifts: Tensor, padding: int, mode: str = "reflect") -> Tensor:
    """Shift sample i's content by shifts[i] = (dy, dx), each in [-padding, padding].

    Pads once (`mode` 'reflect' or 'constant' = zeros), then gathers every crop with one
    advanced-indexing op.
    """
    if padding == 0:
        return images
    n, c, h, w = images.shape
    padded = F.pad(images, (padding,) * 4, mode=mode)
    dev = images.device
    rows = torch.arange(h, device=dev) + (padding - shifts[:, 0:1])  # (N, H)
    cols = torch.arange(w, device=dev) + (padding - shifts[:, 1:2])  # (N, W)
    return padded[
        torch.arange(n, device=dev)[:, None, None, None],
        torch.arange(c, device=dev)[None, :, None, None],
        rows[:, None, :, None],
        cols[:, None, None, :],
    ]


def rotate(images: Tensor, degrees: Tensor) -> Tensor:
    """Rotate sample i counter-clockwise by degrees[i] about its centre (bilinear, zero fill)."""
    n, _, h, w = images.shape
    rad = torch.deg2rad(degrees.to(images.device, torch.float32))
    cos, sin = torch.cos(rad), torch.sin(rad)
    zero = torch.zeros_like(rad)
    # Rotation in pixel units, expressed in affine_grid's [-1, 1] coordinates (exact for H != W too).
    theta = torch.stack([torch.stack([cos, -sin * h / w, zero], 1), torch.stack([sin * w / h, cos, zero], 1)], 1)
    grid = F.affine_grid(theta, [n, 1, h, w], align_corners=False).to(images.dtype)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def _box_mask(top: Tensor, bottom: Tensor, left: Tensor, right: Tensor, h: int, w: int) -> Tensor:
    """(N, H, W) bool mask of the per-sample boxes [top, bottom) x [left, right)."""
    ys = torch.arange(h, device=top.device)
    xs = torch.arange(w, device=top.device)
    in_y = (ys >= top[:, None]) & (ys < bottom[:, None])
    in_x = (xs >= left[:, None]) & (xs < right[:, None])
    return in_y[:, :, None] & in_x[:, None, :]


def cutout(images: Tensor, centers: Tensor, size: int) -> Tensor:
    """Zero a size x size square centred at centers[i] = (y, x) in sample i, clipped at the borders."""
    h, w = images.shape[-2:]
    top, left = centers[:, 0] - size // 2, centers[:, 1] - size // 2
    bottom, right = (top + size).clamp(max=h), (left + size).clamp(max=w)
    mask = _box_mask(top.clamp(min=0), bottom, left.clamp(min=0), right, h, w)
    return images.masked_fill(mask[:, None], 0)


def _draw(generator: torch.Generator | None, device: torch.device, fn, *args, **kwargs) -> Tensor:
    """Call a torch sampling `fn` on the generator's device (or `device`), result on `device`."""
    on = generator.device if generator is not None else device
    return fn(*args, generator=generator, device=on, **kwargs).to(device)


class BatchAugment(nn.Module):
    """The training augmentation policy; call it as `augment(images, labels, generator)`.

    Order: crop (translate), hflip, rotate, RandAugment/TrivialAugment, cutout, MixUp/CutMix.
    """

    def __init__(
        self,
        *,
        hflip: bool = False,
        rotate_degrees: float = 0.0,
        crop_padding: int = 0,
        cutout_size: int = 0,
        auto: str = "none",
        randaugment_num_ops: int = 2,
        randaugment_magnitude: int = 9,
        mixup_alpha: float = 0.0,
        cutmix_alpha: float = 0.0,
        num_classes: int | None = None,
        pad_mode: str = "reflect",
        auto_groups: int = 8,
    ):
        super().__init__()
        if (mixup_alpha > 0 or cutmix_alpha > 0) and num_classes is None:
            raise ValueError("MixUp/CutMix need num_classes to build soft targets")
        self.hflip, self.rotate_degrees = hflip, rotate_degrees
        self.crop_padding, self.cutout_size = crop_padding, cutout_size
        self.mixup_alpha, self.cutmix_alpha, self.num_classes = mixup_alpha, cutmix_alpha, num_classes
        self.pad_mode, self.auto_groups = pad_mode, auto_groups
        self.auto, self.num_ops = auto, (randaugment_num_ops if auto == "randaugment" else 1)
        self.policy = None
        if auto != "none":
            from torchvision.transforms import (
                v2,  # here: torchvision takes ~1.5 s to import
            )

            self.policy = {
                "randaugment": v2.RandAugment(randaugment_num_ops, randaugment_magnitude),
                "trivialaugment": v2.TrivialAugmentWide(),
            }[auto]

    @classmethod
    def from_config(cls, cfg: AugmentConfig, num_classes: int | None = None, **kwargs) -> BatchAugment:
        """Build from the `augment` section of params; `num_classes` is needed for MixUp/CutMix."""
        return cls(**cfg.classification_policy(), num_classes=num_classes, **kwargs)

    @property
    def is_identity(self) -> bool:
        """True when no op is enabled, so training can skip augmentation entirely."""
        return not (
            self.hflip
            or self.rotate_degrees
            or self.crop_padding
            or self.cutout_size
            or self.policy is not None
            or self.mixup_alpha
            or self.cutmix_alpha
        )

    def forward(
        self, images: Tensor, labels: Tensor, generator: torch.Generator | None = None
    ) -> tuple[Tensor, Tensor]:
        return self.augment(images, labels, generator)

    def augment(
        self, images: Tensor, labels: Tensor, generator: torch.Generator | None = None
    ) -> tuple[Tensor, Tensor]:
        """Augment a float (N, C, H, W) batch in [0, 1].

        Returns (images, targets): targets are the int labels unchanged when no mixing is
        enabled, else an (N, num_classes) float tensor of soft targets whose rows sum to 1.
        """
        n, _, h, w = images.shape
        dev, g = images.device, generator
        if self.crop_padding:
            p = self.crop_padding
            images = translate(images, _draw(g, dev, torch.randint, -p, p + 1, (n, 2)), p, self.pad_mode)
        if self.hflip:
            images = hflip(images, _draw(g, dev, torch.rand, n) < 0.5)
        if self.rotate_degrees:
            images = rotate(images, (_draw(g, dev, torch.rand, n) * 2 - 1) * self.rotate_degrees)
        if self.policy is not None:
            images = self._auto(images, g)
        if self.cutout_size:
            centers = torch.stack([_draw(g, dev, torch.randint, 0, size, (n,)) for size in (h, w)], 1)
            images = cutout(images, centers, self.cutout_size)
        if self.mixup_alpha or self.cutmix_alpha:
            return self._mix(images, labels, g)
        return images, labels

    def _auto(self, images: Tensor, g: torch.Generator | None) -> Tensor:
        """RandAugment / TrivialAugmentWide with torchvision's ops and magnitudes, randomised per group.

        Each sample joins one of `auto_groups` random groups; each group gets its own sampled
        op(s), magnitude and sign, applied to the whole group as one batched call. Per-sample
        op diversity is thus `auto_groups`-fold rather than fully independent.
        """
        # _AUGMENTATION_SPACE / _apply_image_or_video_transform are torchvision's own op table and
        # dispatcher (private; torchvision is pinned), so magnitudes match v2.RandAugment exactly.
        policy, dev = self.policy, images.device
        names = list(policy._AUGMENTATION_SPACE)
        bins = policy.num_magnitude_bins
        shape = (self.auto_groups, self.num_ops)
        group = _draw(g, dev, torch.randint, 0, self.auto_groups, (len(images),))
        ops = _draw(g, dev, torch.randint, 0, len(names), shape).tolist()
        mags = _draw(g, dev, torch.randint, 0, bins, shape).tolist()
        flips = (_draw(g, dev, torch.rand, shape) < 0.5).tolist()
        out = images.clone()
        for k in range(self.auto_groups):
            idx = (group == k).nonzero().squeeze(1)
            if len(idx) == 0:
                continue
            x = images[idx]
            for op, mag, flip in zip(ops[k], mags[k], flips[k]):
                magnitudes_fn, signed = policy._AUGMENTATION_SPACE[names[op]]
                magnitudes = magnitudes_fn(bins, *images.shape[-2:])
                m = 0.0
                if magnitudes is not None:
                    m = float(magnitudes[policy.magnitude if self.auto == "randaugment" else mag])
                    m = -m if signed and flip else m
                x = policy._apply_image_or_video_transform(
                    x, names[op], m, interpolation=policy.interpolation, fill=policy._fill
                )
            out[idx] = x
        return out

    def _mix(self, images: Tensor, labels: Tensor, g: torch.Generator | None) -> tuple[Tensor, Tensor]:
        """MixUp or CutMix (one per batch, at random when both are enabled), with a per-sample
        Beta(alpha, alpha) ratio; each sample is mixed with its neighbour in the (shuffled) batch."""
        n, _, h, w = images.shape
        dev = images.device
        coin = self.mixup_alpha == 0 or bool(_draw(g, dev, torch.rand, ()) < 0.5)
        use_cutmix = self.cutmix_alpha > 0 and coin
        alpha = self.cutmix_alpha if use_cutmix else self.mixup_alpha
        seed = int(_draw(g, dev, torch.randint, 0, 2**62, ()))
        lam = torch.from_numpy(np.random.default_rng(seed).beta(alpha, alpha, n)).float().to(dev)
        other = images.roll(1, 0)
        if use_cutmix:
            half = 0.5 * torch.sqrt(1 - lam)
            cy, cx = (_draw(g, dev, torch.randint, 0, size, (n,)) for size in (h, w))
            top, bottom = (cy - (half * h).long()).clamp(min=0), (cy + (half * h).long()).clamp(max=h)
            left, right = (cx - (half * w).long()).clamp(min=0), (cx + (half * w).long()).clamp(max=w)
            mask = _box_mask(top, bottom, left, right, h, w)
            images = torch.where(mask[:, None], other, images)
            lam = 1 - ((bottom - top) * (right - left)).float() / (h * w)
        else:
            lam_img = lam.to(images.dtype).view(-1, 1, 1, 1)
            images = lam_img * images + (1 - lam_img) * other
        onehot = F.one_hot(labels.long(), self.num_classes).float()
        targets = lam[:, None] * onehot + (1 - lam[:, None]) * onehot.roll(1, 0)
        return images, targets
