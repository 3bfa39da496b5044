"""`data.label_fraction`: which train images keep their labels, chosen per image as the splits are.

An image keeps its label when its seeded position (`splits.position`) of "labels:<identity>" falls below
the fraction; the prefix makes that draw independent of the one `download` split by. Its identity here is
what the dataset stores: the source file's SHA-256 (folder, coco, voc, yolo, masks), else the source's name
for the image (digits, cifar10, canvases). So adding images never changes which labels are kept, a larger
fraction keeps a superset, and duplicate files share their fate. The other train images are unlabelled:
only stage `pretrain` sees them.
"""

from __future__ import annotations

import numpy as np

from visionops.data.dataset import Split
from visionops.data.splits import position


def labelled_rows(split: Split, fraction: float, seed: int) -> np.ndarray:
    """The sorted rows of `split` whose labels training keeps (all of them at fraction 1)."""
    if fraction >= 1.0:
        return np.arange(len(split))
    names = split.sha256 or split.paths
    return np.flatnonzero([position(f"labels:{name}", seed) < fraction for name in names])
