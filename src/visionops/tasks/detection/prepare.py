"""Stage `prepare` for detection: repeat-factor sampling (LVIS, Gupta et al. 2019) and the
augmentation policy `train` applies.

Repeat factor of class c: r(c) = max(1, sqrt(t / f(c))), f(c) the fraction of train images holding at
least one instance of c and t = balance.repeat_threshold; an image repeats r(i) = max over its classes
times, rounded stochastically (seeded by balance.seed) so the expected count is exact. Only the train images
`data.label_fraction` keeps labelled are sampled (`visionops.data.labelled`).

Writes to `out_dir`: train_indices.npy (train rows, repeated), repeat_factors.json (per class and per
image), policy.json (balance and augmentation). To `reports_dir`: summary.json and
class_distribution.csv (instances per class before and after).
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

import numpy as np

from visionops import atomic
from visionops.atomic import atomic_dir
from visionops.config import AugmentConfig, BalanceConfig
from visionops.data import dataset
from visionops.data.labelled import labelled_rows
from visionops.errors import InvalidInputError

STRATEGIES = ("none", "repeat_factor")


def repeat_factors(box_labels: np.ndarray, num_classes: int, threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """(per-class r(c), per-image r(i)) for box_labels N x M (-1 pads); an image without objects gets 1."""
    present = np.zeros((len(box_labels), num_classes), bool)
    rows, cols = np.nonzero(box_labels >= 0)
    present[rows, box_labels[rows, cols]] = True
    freq = present.mean(0) if len(box_labels) else np.zeros(num_classes)
    with np.errstate(divide="ignore"):
        per_class = np.where(freq > 0, np.maximum(1.0, np.sqrt(threshold / np.where(freq > 0, freq, 1))), 1.0)
    per_image = np.where(present.any(1), (present * per_class).max(1), 1.0)
    return per_class, per_image


def resample(per_image: np.ndarray, seed: int) -> np.ndarray:
    """Each image index floor(r) times, plus once more with probability r - floor(r); sorted."""
    rng = np.random.default_rng(seed)
    counts = np.floor(per_image).astype(np.int64) + (rng.random(len(per_image)) < per_image - np.floor(per_image))
    return np.repeat(np.arange(len(per_image)), counts)


def instance_counts(box_labels: np.ndarray, num_classes: int) -> np.ndarray:
    return np.bincount(box_labels[box_labels >= 0], minlength=num_classes)


def run_prepare(dataset_dir: Path, balance: BalanceConfig, augment: AugmentConfig, out_dir: Path, reports_dir: Path,
                label_fraction: float = 1.0, label_seed: int = 0) -> dict:
    """`label_fraction` and `label_seed`: data.label_fraction and data.seed."""
    if balance.strategy not in STRATEGIES:
        raise InvalidInputError(f"balance.strategy: {balance.strategy!r} does not apply to detection; "
                                f"use one of {', '.join(STRATEGIES)}")
    ds = dataset.load(dataset_dir)
    labelled = labelled_rows(ds.splits["train"], label_fraction, label_seed)
    box_labels = ds.splits["train"].targets["box_labels"][labelled]
    n = len(ds.class_names)
    if balance.strategy == "repeat_factor":
        per_class, per_image = repeat_factors(box_labels, n, balance.repeat_threshold)
        chosen = resample(per_image, balance.seed)
    else:
        per_class, per_image = np.ones(n), np.ones(len(box_labels))
        chosen = np.arange(len(box_labels))
    before, after = instance_counts(box_labels, n), instance_counts(box_labels[chosen], n)
    with atomic_dir(out_dir) as tmp:
        np.save(tmp / "train_indices.npy", labelled[chosen].astype(np.int64))
        atomic.write_json(tmp / "repeat_factors.json", {
            "per_class": dict(zip(ds.class_names, per_class.round(6).tolist())),
            "per_image": per_image.round(6).tolist(),
        })
        atomic.write_json(tmp / "policy.json", {"balance": balance.model_dump(), "augment": augment.model_dump()})
    present = before > 0
    summary = {
        "strategy": balance.strategy,
        "repeat_threshold": balance.repeat_threshold,
        "train_images_source": len(ds.splits["train"]),
        "labelled_images": len(box_labels),
        "unlabelled_images": len(ds.splits["train"]) - len(box_labels),
        "train_images_after": len(chosen),
        "instances_before": int(before.sum()),
        "instances_after": int(after.sum()),
        "imbalance_ratio_before": float(before[present].max() / before[present].min()) if present.any() else 0.0,
        "imbalance_ratio_after": float(after[present].max() / after[present].min()) if present.any() else 0.0,
        "images_without_objects": int((box_labels < 0).all(1).sum()),
    }
    rows = io.StringIO()
    writer = csv.writer(rows)
    writer.writerow(["class_name", "before", "after"])
    writer.writerows([name, int(before[i]), int(after[i])] for i, name in enumerate(ds.class_names))
    atomic.write_text(reports_dir / "class_distribution.csv", rows.getvalue())
    atomic.write_json(reports_dir / "summary.json", summary)
    return summary
