"""Embedded data for detection and segmentation: scikit-learn's digits composed onto larger canvases.

Each canvas holds a few digits at random positions and scales on a smooth textured background, some
of them overlapping (a later digit is drawn over an earlier one). Generation is seeded, so the
canvases, their exact boxes (the tight box around each digit's ink, occluded parts included) and
their exact per-pixel class masks (the top digit's class wherever its ink shows) are reproducible
without any network.
"""

from __future__ import annotations

import gzip
from dataclasses import dataclass

import numpy as np
from PIL import Image

INK = 0.25  # a glyph pixel is ink (in the mask and the box) where its upscaled value exceeds this
MAX_OVERLAP = 0.3  # a new digit's box may overlap an earlier one by at most this IoU


@dataclass
class Canvases:
    """N canvases: images N x H x W x C uint8; boxes N x M x 4 xyxy pixels (float32); labels N x M
    (digit 0-9, -1 pads); masks N x H x W uint8 (0 background, 1 + digit where that digit's ink shows)."""

    images: np.ndarray
    boxes: np.ndarray
    labels: np.ndarray
    masks: np.ndarray

    def __len__(self) -> int:
        return len(self.images)


def digit_glyphs() -> tuple[np.ndarray, np.ndarray]:
    """The 1,797 8x8 digit glyphs (float 0..1) and their labels, read without importing scikit-learn."""
    from visionops.data.sources.digits import digits_file

    with gzip.open(digits_file(), "rt") as fh:
        data = np.loadtxt(fh, delimiter=",")
    return (data[:, :-1].reshape(-1, 8, 8) / 16.0).astype(np.float32), data[:, -1].astype(np.int64)


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """A smooth low-contrast texture (an upscaled random grid) plus fine noise, values about 10..90."""
    coarse = rng.uniform(0, 1, (6, 6)).astype(np.float32)
    smooth = np.asarray(Image.fromarray(coarse).resize((size, size), Image.BICUBIC))
    lo, hi = rng.uniform(10, 40), rng.uniform(50, 90)
    return lo + (hi - lo) * np.clip(smooth, 0, 1) + rng.normal(0, 4, (size, size)).astype(np.float32)


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def make_canvases(
    n: int,
    size: int = 64,
    seed: int = 0,
    digits: tuple[int, int] = (1, 4),
    scale: tuple[int, int] = (16, 28),
    channels: int = 1,
) -> Canvases:
    """`n` canvases of `size` x `size` with `digits` (min, max) digits each, each glyph upscaled to a
    side in `scale` (min, max) pixels."""
    glyphs, glyph_labels = digit_glyphs()
    rng = np.random.default_rng(seed)
    m = digits[1]
    images = np.zeros((n, size, size, channels), np.uint8)
    boxes = np.zeros((n, m, 4), np.float32)
    labels = np.full((n, m), -1, np.int64)
    masks = np.zeros((n, size, size), np.uint8)
    for i in range(n):
        canvas = _background(rng, size)
        placed: list[np.ndarray] = []
        for _ in range(rng.integers(digits[0], digits[1] + 1)):
            g = rng.integers(len(glyphs))
            side = int(rng.integers(scale[0], scale[1] + 1))
            alpha = np.clip(np.asarray(Image.fromarray(glyphs[g]).resize((side, side), Image.BILINEAR)), 0, 1)
            ink = alpha > INK
            ys, xs = np.nonzero(ink)
            for _attempt in range(20):
                x0, y0 = (int(v) for v in rng.integers(0, size - side + 1, 2))
                box = np.array([x0 + xs.min(), y0 + ys.min(), x0 + xs.max() + 1, y0 + ys.max() + 1], np.float32)
                if all(_iou(box, other) <= MAX_OVERLAP for other in placed):
                    break
            else:
                continue  # no room left for this digit
            k = len(placed)
            placed.append(box)
            boxes[i, k], labels[i, k] = box, glyph_labels[g]
            fg = rng.uniform(170, 255)
            region = canvas[y0 : y0 + side, x0 : x0 + side]
            region[:] = region * (1 - alpha) + fg * alpha
            masks[i, y0 : y0 + side, x0 : x0 + side][ink] = 1 + glyph_labels[g]
        images[i] = np.clip(np.round(canvas), 0, 255).astype(np.uint8)[..., None]
    return Canvases(images, boxes, labels, masks)
