"""Stage `download`: fetch or read the configured source and write the canonical dataset."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from visionops import dataset
from visionops.atomic import atomic_dir
from visionops.config import DataConfig
from visionops.dataset import Dataset, Split
from visionops.images import content_hash
from visionops.sources import load_source
from visionops.splits import stratified_split


def _take(split: Split, idx: np.ndarray) -> Split:
    return Split(
        images=split.images[idx],
        labels=split.labels[idx],
        paths=[split.paths[i] for i in idx],
        orig_shapes=[split.orig_shapes[i] for i in idx] if split.orig_shapes else [],
    )


def carve_splits(splits: dict[str, Split], cfg: DataConfig) -> dict[str, Split]:
    """Carve val (and test, if the source has none) out of train, stratified and seeded."""
    fractions = {name: getattr(cfg, f"{name}_fraction") for name in ("val", "test") if name not in splits}
    train = splits["train"]
    if not fractions or len(train) == 0:
        return {name: splits.get(name, _take(train, np.empty(0, np.int64))) for name in dataset.SPLITS}
    hashes = [content_hash(img) for img in train.images]
    parts = stratified_split(train.labels, hashes, fractions, cfg.seed)
    carved = {**splits, **{name: _take(train, idx) for name, idx in parts.items()}}
    return {name: carved[name] for name in dataset.SPLITS}


def run_download(cfg: DataConfig, out_dir: Path) -> dict:
    """Load `cfg.source`, carve the splits and write the canonical dataset atomically to `out_dir`."""
    src = load_source(cfg)
    ds = Dataset(src.class_names, carve_splits(src.splits, cfg), cfg.source, src.rejected)
    with atomic_dir(out_dir) as tmp:
        dataset.save(ds, tmp)
    return {
        "source": cfg.source,
        "classes": len(ds.class_names),
        "image_shape": list(ds.image_shape),
        "splits": {name: len(s) for name, s in ds.splits.items()},
        "rejected": len(ds.rejected),
        "ignored_non_images": len(src.ignored),
    }
