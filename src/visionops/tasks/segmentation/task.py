"""Semantic segmentation's stage functions (the `Task` protocol): thin calls into this folder's modules."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from visionops.config import Params
from visionops.tasks.base import EpochCallback


class Segmentation:
    name = "segmentation"
    targets = "masks"
    headline = "miou"
    per_class = "per_class_iou"
    paired = "per-image mIoU"
    paired_test = "wilcoxon"

    def download(self, params: Params, out_dir: Path, holdout_dir: Path | None) -> dict:
        from visionops.data.download import run_download

        return run_download(params.data, out_dir, holdout_dir, task=self.name, targets=self.targets)

    def validate(self, params: Params, dataset_dir: Path, reports_dir: Path) -> dict:
        from visionops.tasks.segmentation.validate import run_validate  # written by the data work

        return run_validate(dataset_dir, params.validate_, reports_dir)

    def label_issues(self, params: Params, dataset_dir: Path, reports_dir: Path) -> dict:
        from visionops.tasks.label_issues_report import classification_only

        return classification_only(dataset_dir, reports_dir)

    def prepare(self, params: Params, dataset_dir: Path, prepared_dir: Path, reports_dir: Path) -> dict:
        from visionops.tasks.segmentation.prepare import run_prepare

        return run_prepare(dataset_dir, params.balance, params.augment, prepared_dir, reports_dir,
                           params.data.label_fraction, params.data.seed)

    def train(self, params: Params, dataset_dir: Path, prepared_dir: Path, model_path: Path, reports_dir: Path,
              checkpoint: Path, on_epoch: EpochCallback = None) -> dict:
        from visionops.tasks.segmentation.train import recorded_augment, run_train

        return run_train(dataset_dir, prepared_dir, params.train, recorded_augment(prepared_dir), model_path,
                         reports_dir, checkpoint, on_epoch=on_epoch, mlflow_cfg=params.mlflow, data_root=params.data.root)

    def evaluate(self, params: Params, dataset_dir: Path, model_path: Path, reports_dir: Path,
                 holdout_dir: Path | None = None) -> dict:
        from visionops.tasks.segmentation.evaluate import run_evaluate

        return run_evaluate(dataset_dir, model_path, params.evaluate, reports_dir, params.train.eval_batch_size,
                            params.train.device, params.segmentation, holdout_dir)

    def baseline(self, params: Params, dataset_dir: Path, prepared_dir: Path, teacher_path: Path, reports_dir: Path,
                 checkpoints_dir: Path, on_epoch: EpochCallback = None) -> dict:
        from visionops.tasks.segmentation.baseline import run_baseline
        from visionops.tasks.segmentation.train import recorded_augment

        return run_baseline(dataset_dir, prepared_dir, params.distill, params.train, recorded_augment(prepared_dir),
                            reports_dir, checkpoints_dir, on_epoch=on_epoch, teacher_path=teacher_path)

    def distill(self, params: Params, dataset_dir: Path, prepared_dir: Path, teacher_path: Path, student_path: Path,
                reports_dir: Path, checkpoints_dir: Path, baseline_path: Path, on_epoch: EpochCallback = None,
                holdout_dir: Path | None = None) -> dict:
        from visionops.tasks.segmentation.distill import run_distill
        from visionops.tasks.segmentation.train import recorded_augment

        return run_distill(dataset_dir, prepared_dir, teacher_path, params.distill, params.train,
                           recorded_augment(prepared_dir), student_path, reports_dir, checkpoints_dir,
                           on_epoch=on_epoch, baseline_path=baseline_path, holdout_dir=holdout_dir)

    def log_model(self, model_path: Path, name: str, tags: dict, alias: str | None, profile=None):
        from visionops.tasks.segmentation.serving import log_segmenter

        return log_segmenter(model_path, name, tags=tags, alias=alias, profile=profile)

    def score_served(self, model, split, ds, cfg) -> tuple[dict, np.ndarray]:
        """The served segmenter (the registered pyfunc's model) on `split`: mIoU, per-class IoU, pixel
        accuracy and Dice of its masks, and each image's own mIoU (over the classes in its truth or prediction)."""
        from visionops.tasks.segmentation.evaluate import CORRECT_MIOU, score_masks
        from visionops.tasks.segmentation.serving import decode_mask

        out = model.predict_canonical(np.asarray(split.images))
        pred = np.stack([decode_mask(m) for m in out["mask"]]) if len(out) else np.zeros((0, *ds.image_shape[:2]), np.uint8)
        m = score_masks(pred, np.asarray(split.targets["masks"]), ds.class_names, CORRECT_MIOU)
        metrics = {"n": len(pred), "miou": m["miou"], "pixel_accuracy": m["pixel_accuracy"], "dice": m["dice"],
                   "per_class_iou": {c: v["iou"] for c, v in m["per_class"].items() if v["iou"] is not None},
                   "latency_batch_size": cfg.latency_batch_size}
        return metrics, np.asarray(m["image_miou"], dtype=float)

    def trivial_scores(self, split, ds) -> dict:
        """Every pixel the split's most frequent class: its mIoU and per-class IoU."""
        from visionops.tasks.segmentation.evaluate import CORRECT_MIOU, score_masks
        from visionops.tasks.segmentation.segmenter import IGNORE

        truth = np.asarray(split.targets["masks"])
        counts = np.bincount(truth[truth != IGNORE].ravel(), minlength=len(ds.class_names))
        m = score_masks(np.full_like(truth, counts.argmax()), truth, ds.class_names, CORRECT_MIOU)
        predictor = f"every pixel {ds.class_names[counts.argmax()]}"
        return {"predictor": predictor, "score": m["miou"], "per_class_predictor": predictor,
                "per_class": {c: v["iou"] for c, v in m["per_class"].items() if v["iou"] is not None}}

TASK = Segmentation()
