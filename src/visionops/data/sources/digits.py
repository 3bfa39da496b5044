"""scikit-learn's bundled handwritten digits: 1,797 real 8x8 greyscale images, no network needed."""

from __future__ import annotations

import gzip
import importlib.util
from pathlib import Path

import numpy as np

from visionops.config import DataConfig
from visionops.data.dataset import Split
from visionops.data.images import array_to_canonical, content_hash
from visionops.data.sources import SourceData


def digits_file() -> Path:
    """The CSV that `sklearn.datasets.load_digits` reads, located without importing scikit-learn (~1 s)."""
    return Path(importlib.util.find_spec("sklearn").origin).parent / "datasets" / "data" / "digits.csv.gz"


def load(cfg: DataConfig) -> SourceData:
    with gzip.open(digits_file(), "rt") as fh:
        data = np.loadtxt(fh, delimiter=",")  # one row per image: 64 pixels (0..16 ink levels), then the label
    raw = np.round(data[:, :-1].reshape(-1, 8, 8) * (255.0 / 16.0)).astype(np.uint8)  # -> 0..255
    labels = data[:, -1].astype(np.int64)
    images = np.stack([array_to_canonical(img, cfg.image_size, cfg.channels) for img in raw])
    paths = [f"sklearn-digits:{i}" for i in range(len(raw))]
    identities = [content_hash(img) for img in raw]  # the 8x8 source pixels, whatever the canonical size
    split = Split(images, labels, paths, [(8, 8, 1)] * len(raw), identities=identities)
    return SourceData([str(c) for c in range(10)], {"train": split})
