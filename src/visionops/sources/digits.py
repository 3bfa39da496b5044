"""scikit-learn's bundled handwritten digits: 1,797 real 8x8 greyscale images, no network needed."""

from __future__ import annotations

import numpy as np

from visionops.config import DataConfig
from visionops.dataset import Split
from visionops.images import array_to_canonical
from visionops.sources import SourceData


def load(cfg: DataConfig) -> SourceData:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    raw = np.round(bunch.images * (255.0 / 16.0)).astype(np.uint8)  # 0..16 ink levels -> 0..255
    images = np.stack([array_to_canonical(img, cfg.image_size, cfg.channels) for img in raw])
    paths = [f"sklearn-digits:{i}" for i in range(len(raw))]
    split = Split(images, bunch.target.astype(np.int64), paths, [(8, 8, 1)] * len(raw))
    return SourceData([str(c) for c in bunch.target_names], {"train": split})
