"""Stage `baseline`: the distillation student trained alone (plain cross-entropy), for distill's comparison.

It is a stage of its own, so that changing the KD settings reruns distill only; `distill` reads its result
(`baseline.json`) to report what distillation gained.
Same student, initial weights, seed, schedule and augmentation as the distilled student
(`student_setup` and `train_student` are shared with `distill`); the normalisation statistics are those
of the prepared train images, exactly what the teacher stores.

Writes to `reports_dir`: baseline.json (test and best val accuracy, epochs and the per-epoch history;
its DVC output), and, not hashed by DVC, history.png and measured.json (timings), which the stage's
MLflow run keeps. With `distill.baseline: false` it trains nothing and baseline.json says
`"skipped": true`; distill then reports no KD gain. Resumable from `checkpoint_dir`/student_alone.pt.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from visionops import measured
from visionops.config import AugmentConfig, DistillConfig, TrainConfig
from visionops.data import dataset
from visionops.tasks.classification import classifier
from visionops.tasks.classification.augment import BatchAugment
from visionops.tasks.classification.losses import ClassificationLoss
from visionops.tasks.classification.objective import train_correct, val_scorer
from visionops.tasks.classification.train import load_train_data, privacy_metrics, set_served_rule
from visionops.training.baseline_record import CHECKPOINT, write_result, write_skipped
from visionops.training.device import select_device, to_device
from visionops.training.outputs import fingerprint, run_seconds
from visionops.training.trainer import DistInfo, EpochCallback, fit, init_distributed


@dataclass
class StudentSetup:
    """What training a student needs, shared by the distilled student and the baseline."""

    device: torch.device
    dist_info: DistInfo
    ds: dataset.Dataset
    labels: np.ndarray
    student_cfg: TrainConfig
    hard: nn.Module
    augment: BatchAugment
    train_data: tuple[torch.Tensor, torch.Tensor]
    val_data: tuple[torch.Tensor, torch.Tensor]
    mean: list[float]
    std: list[float]
    common: tuple  # fingerprint parts: settings, augmentation, classes, normalisation, world size
    arrays: tuple  # fingerprint arrays: the train images and labels, the val labels


def student_setup(
    dataset_dir: Path,
    prepared_dir: Path,
    cfg: DistillConfig,
    train_cfg: TrainConfig,
    augment_cfg: AugmentConfig,
    mean: list[float] | None = None,
    std: list[float] | None = None,
) -> StudentSetup:
    """Device, data, loss and augmentation for a `cfg.student`; normalisation `mean`/`std` default to the
    prepared train images' (what the teacher was built with)."""
    device = select_device(train_cfg.device)
    dist_info = init_distributed(device.type)
    if device.type == "cuda" and dist_info.world_size > 1:
        device = torch.device("cuda", dist_info.rank % torch.cuda.device_count())
    ds, images, labels, loss_opts = load_train_data(Path(dataset_dir), Path(prepared_dir))
    if mean is None or std is None:
        mean, std = classifier.normalisation(images, train_cfg.privacy.enabled)
    student_cfg = train_cfg.model_copy(update={"model": cfg.student, "epochs": cfg.epochs, "steps": cfg.steps, "lr": cfg.lr})
    hard = ClassificationLoss(
        train_cfg.label_smoothing, loss_opts["class_weights"], loss_opts["class_priors"], train_cfg.logit_adjust_tau
    ).to(device)
    val = ds.splits["val"]
    common = (student_cfg.model_dump(), augment_cfg.model_dump(), ds.class_names, mean, std, dist_info.world_size)
    return StudentSetup(
        device, dist_info, ds, labels, student_cfg, hard,
        BatchAugment.from_config(augment_cfg, num_classes=len(ds.class_names)),
        to_device(images, labels, device), to_device(val.images, val.labels, device),
        mean, std, common, (images, labels, val.labels),
    )  # fmt: skip


def train_student(s: StudentSetup, desc: str, criterion, checkpoint: Path, digest: str, on_epoch: EpochCallback | None):
    """Train a fresh `s.student_cfg.model` (seeded: the same initial weights for every student)."""
    torch.manual_seed(s.student_cfg.seed)
    model = classifier.build(s.student_cfg.model, s.ds.class_names, s.ds.image_shape, s.mean, s.std)
    return fit(
        model, s.train_data, val_scorer(s.val_data, s.student_cfg, s.device), s.student_cfg, s.augment, criterion,
        s.device, checkpoint=checkpoint, fingerprint=digest, dist_info=s.dist_info, desc=desc, on_epoch=on_epoch,
        train_correct=train_correct,
    )  # fmt: skip


def accuracy(model: nn.Module, images, labels, device: torch.device) -> float | None:
    if len(labels) == 0:
        return None
    logits = classifier.predict_logits(model, np.asarray(images).copy(), device)  # a writable copy of the memmap
    return float((logits.argmax(1).numpy() == np.asarray(labels)).mean())


def run_baseline(
    dataset_dir: Path,
    prepared_dir: Path,
    cfg: DistillConfig,
    train_cfg: TrainConfig,
    augment_cfg: AugmentConfig,
    reports_dir: Path,
    checkpoint_dir: Path,
    on_epoch: EpochCallback | None = None,
) -> dict:
    reports_dir, checkpoint_dir = Path(reports_dir), Path(checkpoint_dir)
    if not cfg.baseline:
        return write_skipped(reports_dir, cfg.student)
    s = student_setup(dataset_dir, prepared_dir, cfg, train_cfg, augment_cfg)
    digest = fingerprint("student_alone", *s.common, arrays=s.arrays)
    hard = s.hard
    criterion = lambda logits, targets, _x: hard(logits, targets)  # plain CE, no teacher
    model, state = train_student(s, "student alone", criterion, checkpoint_dir / CHECKPOINT, digest, on_epoch)
    val, test = s.ds.splits["val"], s.ds.splits["test"]
    set_served_rule(model, train_cfg.tta, val, s.device, train_cfg.eval_batch_size)  # judged as it would be served
    if not s.dist_info.is_main:
        return {"rank": s.dist_info.rank}
    result = {
        "skipped": False,
        "student": cfg.student,
        "device": str(s.device),
        "test_acc": accuracy(model, test.images, test.labels, s.device),
        "best_val_acc": state.best_acc,
        "epochs_run": state.epoch, "steps_run": state.steps,
        "best_epoch": state.best_epoch,
        **run_seconds(state.history, len(s.labels)),
        **privacy_metrics(state.privacy),
    }
    write_result(reports_dir, result, [measured.pure(r) for r in state.history])
    (checkpoint_dir / CHECKPOINT).unlink(missing_ok=True)
    return result

