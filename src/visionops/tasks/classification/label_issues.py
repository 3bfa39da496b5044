"""Likely label errors: confident learning (cleanlab) on out-of-fold predicted probabilities.

`out_of_fold_probs` cross-trains a small classifier K times (stratified folds of the given images),
each time predicting the fold it did not see, so that every image's probabilities come from a model
that never trained on its label. `rank_label_issues` hands them to cleanlab (Northcutt et al., 2021).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import numpy as np
import torch

from visionops.config import AugmentConfig, LabelIssuesConfig, TrainConfig
from visionops.errors import InvalidInputError
from visionops.tasks.classification import classifier
from visionops.tasks.classification.augment import BatchAugment
from visionops.tasks.classification.objective import val_scorer
from visionops.training.device import select_device, to_device
from visionops.training.trainer import fit


@dataclass
class LabelIssues:
    """The images whose given label is likely wrong, worst first, and what the probabilities say of each."""

    ranked: np.ndarray  # indices of the issues, lowest label quality first
    quality: np.ndarray  # every image's label quality score (self-confidence: the probability of its given label)
    suggested: np.ndarray  # every image's most probable class


def rank_label_issues(labels: np.ndarray, pred_probs: np.ndarray, filter_by: str = "prune_by_noise_rate") -> LabelIssues:
    """Confident learning on out-of-fold `pred_probs` (N x K) of the given `labels` (N,)."""
    from cleanlab.filter import find_label_issues
    from cleanlab.rank import get_label_quality_scores

    labels = np.asarray(labels, dtype=np.int64)
    ranked = find_label_issues(labels, pred_probs, filter_by=filter_by, return_indices_ranked_by="self_confidence",
                               n_jobs=1)
    quality = get_label_quality_scores(labels, pred_probs, method="self_confidence")
    return LabelIssues(np.asarray(ranked, dtype=np.int64), quality, pred_probs.argmax(1))


def fold_train_config(cfg: LabelIssuesConfig, train: TrainConfig) -> TrainConfig:
    """The settings of each fold's training run: label_issues' own, and train's device and speed settings."""
    return TrainConfig(model=cfg.model, epochs=cfg.epochs, batch_size=cfg.batch_size, optimizer=cfg.optimizer, lr=cfg.lr,
                       seed=cfg.seed, device=train.device, amp=train.amp, channels_last=train.channels_last,
                       eval_batch_size=train.eval_batch_size, threads=train.threads)


def stratified_folds(labels: np.ndarray, folds: int, seed: int) -> list[np.ndarray]:
    """The held-out indices of each of `folds` folds; every class needs at least `folds` images."""
    from sklearn.model_selection import StratifiedKFold

    counts = np.bincount(labels)
    present = counts[counts > 0]
    if present.min() < folds:
        rare = int(np.flatnonzero(counts == present.min())[0])
        raise InvalidInputError(f"label_issues.folds: {folds} folds need at least {folds} train images of every class; "
                                f"class {rare} has {int(present.min())}")
    split = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed).split(np.zeros(len(labels)), labels)
    return [held for _, held in split]


def out_of_fold_probs(
    images: np.ndarray,
    labels: np.ndarray,
    class_names: list[str],
    cfg: TrainConfig,
    augment: AugmentConfig,
    folds: int,
    val: tuple[np.ndarray, np.ndarray],
) -> np.ndarray:
    """N x K probabilities of uint8 NHWC `images`, each from the fold model that did not train on it.

    Each fold trains `cfg.model` for `cfg.epochs` and keeps its best epoch on `val` (images, labels: a split
    apart from the folds); with no val images it keeps the best epoch by its own training images' accuracy.
    """
    device = select_device(cfg.device)
    probs = np.zeros((len(labels), len(class_names)), dtype=np.float32)
    aug = BatchAugment.from_config(augment, num_classes=len(class_names))
    for k, held in enumerate(stratified_folds(labels, folds, cfg.seed)):
        fit_idx = np.setdiff1d(np.arange(len(labels)), held)
        x, y = images[fit_idx], labels[fit_idx]
        mean, std = classifier.channel_stats(x)
        torch.manual_seed(cfg.seed + k)
        model = classifier.build(cfg.model, class_names, images.shape[1:], mean, std)
        train = to_device(x, y, device)
        scored = to_device(*val, device) if len(val[1]) else train
        model, _ = fit(model, train, val_scorer(scored, cfg, device), cfg, aug,
                       lambda logits, targets, _x: torch.nn.functional.cross_entropy(logits.float(), targets), device,
                       desc=f"label_issues fold {k + 1}/{folds}")
        logits = classifier.predict_logits(model, images[held], device, cfg.eval_batch_size, calibrated=False)
        probs[held] = torch.softmax(logits, 1).numpy()
        print(f"label_issues: fold {k + 1}/{folds} trained on {len(fit_idx)} images, predicted {len(held)}", file=sys.stderr)
    return probs
