"""Training a detection student, shared by `baseline` (alone) and `distill` (with the teacher):
the same student, initial weights (train.seed, or the teacher's strongest channels with `distill.init:
teacher`), schedule, augmentation and data for both."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from visionops.config import AugmentConfig, DetectionConfig, DistillConfig, TrainConfig
from visionops.tasks.detection.train import fit_detector, load_train_data
from visionops.training.trainer import EpochCallback


def student_config(cfg: DistillConfig, train_cfg: TrainConfig) -> TrainConfig:
    return train_cfg.model_copy(update={"model": cfg.student, "epochs": cfg.epochs, "steps": cfg.steps, "lr": cfg.lr})


def train_student(dataset_dir: Path, prepared_dir: Path, cfg: DistillConfig, train_cfg: TrainConfig,
                  augment_cfg: AugmentConfig, rule: DetectionConfig, checkpoint: Path | None, desc: str,
                  on_epoch: EpochCallback | None = None, criterion_for: Callable | None = None,
                  extra_fingerprint: object = None, teacher=None):
    """(dataset, student, trainer state, run facts, the prepared train images). With `distill.init: teacher`
    the student starts from `teacher` (a `Detector`)."""
    ds, images, boxes, labels = load_train_data(dataset_dir, prepared_dir)
    student_cfg = student_config(cfg, train_cfg)
    model, state, facts = fit_detector(student_cfg.model, ds, (images, boxes, labels), student_cfg, augment_cfg, rule,
                                       checkpoint, desc, on_epoch, criterion_for=criterion_for,
                                       extra_fingerprint=(cfg.init, extra_fingerprint),
                                       start=teacher if cfg.init == "teacher" else None)
    return ds, model, state, facts, images
