"""Detection datasets for the tests, written directly from the embedded canvases."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from visionops.data import dataset
from visionops.data.canvases import make_canvases
from visionops.data.dense import DenseObject, ImageFacts, write_tables


def dominant(labels: np.ndarray) -> np.ndarray:
    """Each image's most frequent class (ties: lowest id; no objects: 0)."""
    out = np.zeros(len(labels), np.int64)
    for i, row in enumerate(labels):
        row = row[row >= 0]
        if len(row):
            out[i] = np.bincount(row).argmax()
    return out


def write_detection_dataset(root: Path, sizes=(("train", 200), ("val", 40), ("test", 60)), seed: int = 0) -> Path:
    """A canvases detection dataset at `root` (64 x 64 greyscale, classes "0".."9"), with the objects.csv and
    targets.csv download writes (the canvases are their own source, so source boxes are the canonical ones)."""
    splits = {}
    for k, (name, n) in enumerate(sizes):
        c = make_canvases(n, 64, seed=seed + 1000 * k)
        splits[name] = dataset.Split(c.images, dominant(c.labels), [f"{name}/{i}.png" for i in range(n)],
                                     targets={"boxes": c.boxes, "box_labels": c.labels})
    ds = dataset.Dataset([str(d) for d in range(10)], splits, "canvases", task="detection")
    dataset.save(ds, root)
    for name, split in splits.items():
        facts = {path: ImageFacts([DenseObject(str(c), str(c), int(c), tuple(map(float, b)))
                                   for b, c in zip(boxes, labels) if c >= 0], None, [])
                 for path, boxes, labels in zip(split.paths, split.targets["boxes"], split.targets["box_labels"])}
        write_tables(root / name, split, facts)
    return root
