"""CIFAR-10-C-style shifts for the drift benchmark: five corruptions at severities 1-5, and windows of images
drawn from a pool, unshifted or with a class-prior shift.

The severities are the parameters of Hendrycks & Dietterich (ICLR 2019), `make_cifar_c.py`, applied with
torchvision.transforms.v2 functionals on float images in [0, 1], rounded back to uint8:

- gaussian_noise: `gaussian_noise`, sigma as in the paper (clipped to [0, 1]).
- gaussian_blur: `gaussian_blur`, sigma as in the paper; kernel side 2 * round(4 sigma) + 1 (skimage's
  truncation at 4 sigma; the paper's skimage pads by nearest edge, torchvision by reflection).
- brightness: `adjust_brightness` (a factor) where the paper adds c to the HSV value: the factor is 1 + c / 0.5,
  the paper's shift of a pixel of value 0.5 (darker pixels brighten less than in the paper, brighter ones more).
- contrast: `adjust_contrast`, factor c as in the paper; it scales around the image's mean grey, the paper
  around each channel's mean.
- jpeg: `jpeg` at the paper's qualities.
Nothing here is written by hand but the severity tables and the window draws.
"""

from __future__ import annotations

import numpy as np
import torch
import torchvision.transforms.v2.functional as F

SEVERITIES: dict[str, tuple[float, ...]] = {  # severity s -> the paper's parameter SEVERITIES[name][s - 1]
    "gaussian_noise": (0.04, 0.06, 0.08, 0.09, 0.10),  # noise sigma
    "gaussian_blur": (0.4, 0.6, 0.7, 0.8, 1.0),  # blur sigma (pixels)
    "brightness": (0.05, 0.1, 0.15, 0.2, 0.3),  # HSV value shift
    "contrast": (0.75, 0.5, 0.4, 0.3, 0.15),  # contrast factor
    "jpeg": (80, 65, 58, 50, 40),  # JPEG quality
}
CORRUPTIONS = tuple(SEVERITIES)


def corrupt(images: np.ndarray, name: str, severity: int, seed: int = 0) -> np.ndarray:
    """`images` (uint8 N x H x W x C) with corruption `name` at `severity` (1-5); `seed` fixes the noise."""
    if name not in SEVERITIES:
        raise ValueError(f"unknown corruption {name!r}; known: {', '.join(CORRUPTIONS)}")
    if not 1 <= severity <= 5:
        raise ValueError(f"severity {severity} is not in 1..5")
    c = SEVERITIES[name][severity - 1]
    x = torch.from_numpy(np.array(images, dtype=np.uint8)).permute(0, 3, 1, 2)  # a copy: the input may be read-only
    if name == "jpeg":
        return F.jpeg(x.contiguous(), quality=int(c)).permute(0, 2, 3, 1).numpy()
    x = x.float() / 255
    if name == "gaussian_noise":
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            x = F.gaussian_noise(x, sigma=c, clip=True)
    elif name == "gaussian_blur":
        side = 2 * int(4 * c + 0.5) + 1
        x = F.gaussian_blur(x, [side, side], [c, c])
    elif name == "brightness":
        x = F.adjust_brightness(x, 1 + c / 0.5)
    else:
        x = F.adjust_contrast(x, c)
    return (x * 255).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()


def sample_window(labels: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """Indices of `size` pool images drawn without replacement: an unshifted window."""
    return rng.choice(len(labels), size=size, replace=False)


def prior_shift_window(labels: np.ndarray, size: int, rng: np.random.Generator, classes: int = 2,
                       share: float = 0.5) -> np.ndarray:
    """Indices of a window whose `share` comes from `classes` classes drawn at random, the rest from the others
    (a class-prior shift: with 10 balanced classes, 2 classes at 25% each instead of 10%)."""
    chosen = rng.choice(np.unique(labels), size=classes, replace=False)
    inside = np.isin(labels, chosen)
    n_in = round(size * share)
    return np.concatenate([rng.choice(np.flatnonzero(inside), size=n_in, replace=False),
                           rng.choice(np.flatnonzero(~inside), size=size - n_in, replace=False)])
