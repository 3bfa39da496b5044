"""Stage `prepare`: class balancing and the augmentation policy that `train` applies on the fly.

Writes to `out_dir`: train_indices.npy (rows of the dataset's train split, repeated when
oversampled), loss.json (class weights or priors for the loss), policy.json (the validated
balance and augmentation policy), and with `balance.offline` an offline/ folder of augmented
minority images. Writes to `reports_dir`: summary.json, class_distribution.csv (no DVC
metrics: validate's imbalance ratio and evaluate's balanced accuracy are the headline numbers).
Only the train images `data.label_fraction` keeps labelled are trained on (`visionops.data.labelled`); with
`balance.drop_label_issues`, the train images that stage `label_issues` listed are left out too (val, test
and the holdout keep theirs).
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
from visionops.errors import InvalidInputError, MissingInputError
from visionops.tasks.classification.balance import (
    class_counts,
    class_priors,
    class_weights,
    resample,
    simulate_long_tail,
)


def _imbalance(counts: np.ndarray) -> float:
    present = counts[counts > 0]
    return float(present.max() / present.min()) if len(present) else 0.0


def select_train(labels: np.ndarray, num_classes: int, cfg: BalanceConfig) -> tuple[np.ndarray, np.ndarray]:
    """The long-tailed subset (if simulated) and the resampled training indices."""
    rng = np.random.default_rng(cfg.seed)
    base = np.arange(len(labels))
    if cfg.simulate_imbalance_factor > 1:
        base = simulate_long_tail(labels, num_classes, cfg.simulate_imbalance_factor, rng)
    chosen = resample(base, labels, cfg.strategy, rng) if cfg.strategy in ("oversample", "undersample") else base
    return base, chosen


def label_issue_rows(issues_csv: Path, split: dataset.Split) -> np.ndarray:
    """The train rows `issues_csv` (stage label_issues' report) lists, checked against the split's paths."""
    if not Path(issues_csv).is_file():
        raise MissingInputError(f"{issues_csv}: no label-issue report for balance.drop_label_issues "
                                "(run `visionops label_issues`)")
    with Path(issues_csv).open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    for row in rows:
        index = int(row["index"])
        if index >= len(split) or split.paths[index] != row["path"]:
            raise InvalidInputError(f"{issues_csv}: row {row['rank']} names {row['path']!r} at train index {index}, which "
                                    "the dataset does not hold there (a report of other data: rerun `visionops label_issues`)")
    return np.array([int(r["index"]) for r in rows], dtype=np.int64)


def augmented_copies(images: np.ndarray, labels: np.ndarray, augment: AugmentConfig, seed: int) -> np.ndarray:
    """Augment uint8 NHWC images once with the policy, without MixUp/CutMix (for offline oversampling)."""
    import torch

    from visionops.tasks.classification.augment import BatchAugment

    aug = BatchAugment.from_config(augment.model_copy(update={"mixup_alpha": 0.0, "cutmix_alpha": 0.0}))
    gen = torch.Generator().manual_seed(seed)
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 255
    out, _ = aug(x, torch.from_numpy(labels), gen)
    return (out.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def run_prepare(
    dataset_dir: Path, balance: BalanceConfig, augment: AugmentConfig, out_dir: Path, reports_dir: Path,
    label_issues_csv: Path | None = None, label_fraction: float = 1.0, label_seed: int = 0,
) -> dict:
    """`label_issues_csv`: stage label_issues' report, whose train images are left out (None: keep all);
    `label_fraction` and `label_seed`: data.label_fraction and data.seed."""
    ds = dataset.load(dataset_dir)
    labels = ds.splits["train"].labels
    n = len(ds.class_names)
    labelled = labelled_rows(ds.splits["train"], label_fraction, label_seed)
    dropped = label_issue_rows(label_issues_csv, ds.splits["train"]) if label_issues_csv else np.empty(0, np.int64)
    kept = np.setdiff1d(labelled, dropped)
    base, chosen = (kept[i] for i in select_train(labels[kept], n, balance))
    before, after = class_counts(labels, n), class_counts(labels[chosen], n)
    loss = {
        "class_weights": class_weights(after).tolist() if balance.strategy == "class_weights" else None,
        "class_priors": class_priors(after).tolist() if balance.strategy == "logit_adjust" else None,
    }
    with atomic_dir(out_dir) as tmp:
        if balance.offline:
            # Keep each original once; every repeat becomes an augmented copy.
            originals = np.isin(np.arange(len(chosen)), np.unique(chosen, return_index=True)[1])
            repeats = chosen[~originals]
            (tmp / "offline").mkdir()
            np.save(tmp / "offline" / "images.npy", augmented_copies(ds.splits["train"].images[repeats], labels[repeats], augment, balance.seed))
            np.save(tmp / "offline" / "labels.npy", labels[repeats])
            chosen = chosen[originals]
        np.save(tmp / "train_indices.npy", chosen.astype(np.int64))
        atomic.write_json(tmp / "loss.json", loss)
        atomic.write_json(tmp / "policy.json", {"balance": balance.model_dump(), "augment": augment.classification_policy()})
    summary = {
        "strategy": balance.strategy,
        "train_images_source": int(len(labels)),
        "labelled_images": int(len(labelled)),
        "unlabelled_images": int(len(labels) - len(labelled)),
        "label_issues_dropped": int(len(labelled) - len(kept)),
        "train_images_long_tail": int(len(base)),
        "train_images_after": int(after.sum()),
        "imbalance_ratio_before": _imbalance(class_counts(labels[base], n)),
        "imbalance_ratio_after": _imbalance(after),
        "offline_augmented": int(after.sum() - len(chosen)),
    }
    rows = io.StringIO()
    writer = csv.writer(rows)
    writer.writerow(["class_name", "source", "long_tail", "after"])
    lt = class_counts(labels[base], n)
    writer.writerows([name, int(before[i]), int(lt[i]), int(after[i])] for i, name in enumerate(ds.class_names))
    atomic.write_text(reports_dir / "class_distribution.csv", rows.getvalue())
    atomic.write_json(reports_dir / "summary.json", summary)
    return summary
