"""Progressive resizing: the first epochs train on smaller images, so they cost less (as in FFCV's ImageNet
recipes and fast.ai's; Touvron et al. 2019 on why the last epochs should see the full size).

`train.progressive_start` is the side's fraction at the first epoch; it ramps linearly up to the full side
over the first `train.progressive_epochs` epochs, and the remaining epochs (and every validation pass) see
the full size. Sides are rounded (halves up) to multiples of 8, the default segmenter's coarsest stride.
"""

from __future__ import annotations

import math

MULTIPLE = 8


def epoch_sides(start: float, ramp_epochs: int, epochs: int, height: int, width: int) -> list[tuple[int, int] | None]:
    """Each epoch's training (height, width), or None where it is the full size."""

    def side(full: int, fraction: float) -> int:
        return min(full, max(MULTIPLE, math.floor(full * fraction / MULTIPLE + 0.5) * MULTIPLE))

    sides: list[tuple[int, int] | None] = []
    for epoch in range(epochs):
        fraction = start + (1 - start) * epoch / ramp_epochs if epoch < ramp_epochs else 1.0
        size = (side(height, fraction), side(width, fraction))
        sides.append(None if size == (height, width) else size)
    return sides
