"""Stage `prepare` for segmentation: class-frequency pixel weights and the augmentation policy.

`balance.strategy: class_weights` weights each pixel's loss by its true class: median-frequency
balancing (Eigen & Fergus 2015), w_c = median(f) / f_c, where f_c is class c's pixels over the pixels of
the train images in which c occurs. `none` trains unweighted. Other strategies (resampling, logit
adjustment) are classification's and are refused.

Writes to `out_dir`: train_indices.npy (every train image `data.label_fraction` keeps labelled, once), loss.json (`pixel_weights`, or null),
policy.json (the balance and augmentation policy train applies). To `reports_dir`: summary.json and
class_distribution.csv (per class: train pixels `before`, and `after` = pixels x weight, the share
of the loss the class carries).
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
from visionops.tasks.segmentation.segmenter import IGNORE

STRATEGIES = ("none", "class_weights")


def pixel_counts(masks: np.ndarray, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """(pixels of each class, pixels of the images each class occurs in); IGNORE pixels left out."""
    pixels = np.zeros(num_classes, np.int64)
    image_pixels = np.zeros(num_classes, np.int64)
    for mask in masks:
        counts = np.bincount(mask[mask != IGNORE].ravel(), minlength=num_classes)[:num_classes]
        pixels += counts
        image_pixels += np.where(counts > 0, counts.sum(), 0)
    return pixels, image_pixels


def median_frequency_weights(pixels: np.ndarray, image_pixels: np.ndarray) -> np.ndarray:
    """Eigen & Fergus (2015): median(f) / f_c with f_c = pixels_c / image_pixels_c; an absent class gets 0."""
    present = pixels > 0
    freq = np.where(present, pixels / np.maximum(image_pixels, 1), 0.0)
    weights = np.zeros(len(pixels))
    weights[present] = np.median(freq[present]) / freq[present]
    return weights


def run_prepare(dataset_dir: Path, balance: BalanceConfig, augment: AugmentConfig, out_dir: Path, reports_dir: Path,
                label_fraction: float = 1.0, label_seed: int = 0) -> dict:
    """`label_fraction` and `label_seed`: data.label_fraction and data.seed."""
    if balance.strategy not in STRATEGIES:
        raise InvalidInputError(
            f"balance.strategy: {balance.strategy!r} is not available for segmentation; use one of {', '.join(STRATEGIES)}"
        )
    ds = dataset.load(dataset_dir)
    train = ds.splits["train"]
    labelled = labelled_rows(train, label_fraction, label_seed)
    n = len(ds.class_names)
    pixels, image_pixels = pixel_counts(train.targets["masks"][labelled], n)
    weights = median_frequency_weights(pixels, image_pixels) if balance.strategy == "class_weights" else np.ones(n)
    with atomic_dir(out_dir) as tmp:
        np.save(tmp / "train_indices.npy", labelled.astype(np.int64))
        atomic.write_json(tmp / "loss.json", {"pixel_weights": weights.tolist() if balance.strategy == "class_weights" else None})
        atomic.write_json(tmp / "policy.json", {"balance": balance.model_dump(), "augment": augment.model_dump()})
    after = pixels * weights
    present = pixels > 0
    summary = {
        "strategy": balance.strategy,
        "weighting": "median_frequency" if balance.strategy == "class_weights" else "none",
        "train_images": int(len(train)),
        "labelled_images": int(len(labelled)),
        "unlabelled_images": int(len(train) - len(labelled)),
        "train_pixels": int(pixels.sum()),
        "pixel_imbalance_ratio_before": float(pixels[present].max() / pixels[present].min()) if present.any() else None,
        "pixel_imbalance_ratio_after": float(after[present].max() / after[present].min()) if present.any() else None,
        "pixel_weights": dict(zip(ds.class_names, weights.round(6).tolist())),
    }
    rows = io.StringIO()
    writer = csv.writer(rows)
    writer.writerow(["class_name", "before", "after"])
    writer.writerows([name, int(pixels[i]), round(float(after[i]), 3)] for i, name in enumerate(ds.class_names))
    atomic.write_text(reports_dir / "class_distribution.csv", rows.getvalue())
    atomic.write_json(reports_dir / "summary.json", summary)
    return summary
