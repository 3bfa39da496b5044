"""Stage `baseline` for detection: the distillation student trained alone (its own loss on the true
boxes), with the same init, seed, schedule and augmentation as the distilled student.

With `distill.init: teacher` both students start from the teacher's strongest channels, so the KD gain is the
distillation loss's alone.

Writes reports_dir/baseline.json (test mAP@.5 and mAP, best val mAP@.5, history; DVC's output) and
measured.json and history.png beside it. With `distill.baseline: false` it trains nothing and writes
`"skipped": true`. Resumable from checkpoints_dir/student_alone.pt.
"""

from __future__ import annotations

from pathlib import Path

from visionops import measured
from visionops.config import AugmentConfig, DetectionConfig, DistillConfig, TrainConfig
from visionops.data.fetch import file_md5
from visionops.tasks.detection import detector
from visionops.tasks.detection.evaluate import score_split
from visionops.tasks.detection.student import train_student
from visionops.training.baseline_record import CHECKPOINT, write_result, write_skipped
from visionops.training.outputs import run_seconds
from visionops.training.trainer import EpochCallback


def run_baseline(dataset_dir: Path, prepared_dir: Path, cfg: DistillConfig, train_cfg: TrainConfig,
                 augment_cfg: AugmentConfig, rule: DetectionConfig, reports_dir: Path, checkpoints_dir: Path,
                 on_epoch: EpochCallback | None = None, teacher_path: Path | None = None) -> dict:
    if not cfg.baseline:
        return write_skipped(reports_dir, cfg.student)
    checkpoint = checkpoints_dir / CHECKPOINT
    teacher = detector.load(teacher_path)[0] if cfg.init == "teacher" else None
    ds, model, state, facts, images = train_student(
        dataset_dir, prepared_dir, cfg, train_cfg, augment_cfg, rule, checkpoint, "baseline", on_epoch,
        extra_fingerprint=file_md5(teacher_path) if teacher is not None else None, teacher=teacher)
    test = score_split(model, ds.splits["test"], ds.class_names)
    history = [measured.pure(row) for row in state.history]
    result = {
        "skipped": False,
        "student": cfg.student,
        "test_map_50": test["map_50"],
        "test_map": test["map"],
        "best_val_map_50": state.best_acc,
        "best_epoch": state.best_epoch,
        "epochs_run": state.epoch, "steps_run": state.steps,
        "init": cfg.init,
        **run_seconds(state.history, len(images)),
    }
    if facts["is_main"]:
        write_result(reports_dir, result, history)
        checkpoint.unlink(missing_ok=True)
    return result
