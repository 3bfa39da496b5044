"""Stage `baseline` for segmentation: the distillation student trained alone (weighted pixel CE), with the
same initial weights, seed, schedule and augmentation as the distilled student; distill reads its
`baseline.json` to report what distillation gained. With `distill.init: teacher` both start from the
teacher's strongest channels, so the gain is the distillation loss's alone. `distill.baseline: false` writes
a skipped record.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from visionops import measured
from visionops.config import AugmentConfig, DistillConfig, TrainConfig
from visionops.tasks.segmentation import segmenter
from visionops.tasks.segmentation.evaluate import score_masks
from visionops.tasks.segmentation.train import Setup, load_teacher, setup
from visionops.training.baseline_record import CHECKPOINT, write_result, write_skipped
from visionops.training.outputs import fingerprint, run_seconds


def student_config(cfg: DistillConfig, train_cfg: TrainConfig) -> TrainConfig:
    """The teacher's settings with the student's model, epochs and lr, at full size throughout: in 3 epochs, one
    at a smaller size cost the preset's students 0.005 to 0.26 test mIoU (48 and 32 px of 64)."""
    update = {"model": cfg.student, "epochs": cfg.epochs, "steps": cfg.steps, "lr": cfg.lr, "progressive_start": 1.0,
              "progressive_epochs": 0}
    return train_cfg.model_copy(update=update)


def split_scores(s: Setup, model, batch_size: int) -> dict:
    test = s.ds.splits["test"]
    pred = segmenter.predict_masks(model, test.images, s.device, batch_size)
    m = score_masks(pred, np.asarray(test.targets["masks"]), s.ds.class_names, 0.5)
    return {"miou": m["miou"], "pixel_accuracy": m["pixel_accuracy"], "dice": m["dice"]}


def run_baseline(dataset_dir: Path, prepared_dir: Path, cfg: DistillConfig, train_cfg: TrainConfig,
                 augment_cfg: AugmentConfig, reports_dir: Path, checkpoint_dir: Path, on_epoch=None,
                 teacher_path: Path | None = None) -> dict:
    reports_dir, checkpoint_dir = Path(reports_dir), Path(checkpoint_dir)
    if not cfg.baseline:
        return write_skipped(reports_dir, cfg.student)
    student_cfg = student_config(cfg, train_cfg)
    s = setup(dataset_dir, prepared_dir, student_cfg, augment_cfg)
    start = load_teacher(teacher_path, s, student_cfg.channels_last)[0] if cfg.init == "teacher" else None
    teacher_bytes = (np.frombuffer(Path(teacher_path).read_bytes(), np.uint8),) if start is not None else ()
    digest = fingerprint("student_alone", student_cfg.model_dump(), cfg.init, *s.digest_parts, arrays=(*s.arrays, *teacher_bytes))
    hard = s.hard
    model, state = s.fit(cfg.student, student_cfg, lambda logits, masks, _x: hard(logits, masks),
                         checkpoint_dir / CHECKPOINT, digest, "student alone", on_epoch, start=start)
    if not s.dist_info.is_main:
        return {"rank": s.dist_info.rank}
    scores = split_scores(s, model, train_cfg.eval_batch_size)
    result = {
        "skipped": False, "student": cfg.student, "device": str(s.device), "test_miou": scores["miou"],
        "test_pixel_accuracy": scores["pixel_accuracy"], "best_val_miou": state.best_acc, "epochs_run": state.epoch, "steps_run": state.steps,
        "best_epoch": state.best_epoch, "init": cfg.init, **run_seconds(state.history, len(s.arrays[0])),
    }  # fmt: skip
    write_result(reports_dir, result, [measured.pure(r) for r in state.history])
    (checkpoint_dir / CHECKPOINT).unlink(missing_ok=True)
    return result

