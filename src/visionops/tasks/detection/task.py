"""Object detection's stage functions (the `Task` protocol): thin calls into this folder's modules."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from visionops.config import Params
from visionops.tasks.base import EpochCallback


class Detection:
    name = "detection"
    targets = "boxes"
    headline = "map_50"
    per_class = "per_class_ap50"
    paired = "per-image F1 (IoU 0.5, class matched)"
    paired_test = "wilcoxon"

    def download(self, params: Params, out_dir: Path, holdout_dir: Path | None) -> dict:
        from visionops.data.download import run_download

        return run_download(params.data, out_dir, holdout_dir, task=self.name, targets=self.targets)

    def validate(self, params: Params, dataset_dir: Path, reports_dir: Path) -> dict:
        from visionops.tasks.detection.validate import run_validate

        return run_validate(dataset_dir, params.validate_, reports_dir, params.detection.max_detections)

    def label_issues(self, params: Params, dataset_dir: Path, reports_dir: Path) -> dict:
        from visionops.tasks.label_issues_report import classification_only

        return classification_only(dataset_dir, reports_dir)

    def prepare(self, params: Params, dataset_dir: Path, prepared_dir: Path, reports_dir: Path) -> dict:
        from visionops.tasks.detection.prepare import run_prepare

        return run_prepare(dataset_dir, params.balance, params.augment, prepared_dir, reports_dir,
                           params.data.label_fraction, params.data.seed)

    def train(self, params: Params, dataset_dir: Path, prepared_dir: Path, model_path: Path, reports_dir: Path,
              checkpoint: Path, on_epoch: EpochCallback = None) -> dict:
        from visionops.tasks.detection.train import recorded_augment, run_train

        return run_train(dataset_dir, prepared_dir, params.train, recorded_augment(prepared_dir), params.detection,
                         model_path, reports_dir, checkpoint, on_epoch=on_epoch, mlflow_cfg=params.mlflow,
                         data_root=params.data.root)

    def evaluate(self, params: Params, dataset_dir: Path, model_path: Path, reports_dir: Path,
                 holdout_dir: Path | None = None) -> dict:
        from visionops.tasks.detection.evaluate import run_evaluate

        return run_evaluate(dataset_dir, model_path, params.evaluate, reports_dir, params.train.eval_batch_size, holdout_dir)

    def baseline(self, params: Params, dataset_dir: Path, prepared_dir: Path, teacher_path: Path, reports_dir: Path,
                 checkpoints_dir: Path, on_epoch: EpochCallback = None) -> dict:
        from visionops.tasks.detection.baseline import run_baseline
        from visionops.tasks.detection.train import recorded_augment

        return run_baseline(dataset_dir, prepared_dir, params.distill, params.train, recorded_augment(prepared_dir),
                            params.detection, reports_dir, checkpoints_dir, on_epoch=on_epoch, teacher_path=teacher_path)

    def distill(self, params: Params, dataset_dir: Path, prepared_dir: Path, teacher_path: Path, student_path: Path,
                reports_dir: Path, checkpoints_dir: Path, baseline_path: Path, on_epoch: EpochCallback = None,
                holdout_dir: Path | None = None) -> dict:
        from visionops.tasks.detection.distill import run_distill
        from visionops.tasks.detection.train import recorded_augment

        return run_distill(dataset_dir, prepared_dir, teacher_path, params.distill, params.train,
                           recorded_augment(prepared_dir), params.detection, student_path, reports_dir,
                           checkpoints_dir, on_epoch=on_epoch, baseline_path=baseline_path, holdout_dir=holdout_dir)

    def log_model(self, model_path: Path, name: str, tags: dict, alias: str | None, profile=None):
        """Register `model_path` as a new version of `name` (models-from-code: served.py)."""
        from visionops.serving.pyfunc import log_pyfunc
        from visionops.tasks.detection import detector
        from visionops.tasks.detection.served import SERVED_MODEL_CODE, signature

        _, info = detector.load(model_path)  # fails early and clearly on a missing/corrupt file
        metadata = {"task": self.name, "class_names": list(info["class_names"]), "arch": info["arch"],
                    "image_shape": [int(s) for s in info["image_shape"]], "rule": info["rule"],
                    "resize": info.get("resize", "squash")}
        return log_pyfunc(model_path, name, code=SERVED_MODEL_CODE, signature=signature(), metadata=metadata,
                          tags=tags, alias=alias, profile=profile)

    def score_served(self, model, split, ds, cfg) -> tuple[dict, np.ndarray]:
        """The served detector (the registered pyfunc's model) on `split`: mAP@.5 of its detections at its
        served score threshold, mAP@[.5:.95], per-class AP@.5 (promotion's class gate) and AP@[.5:.95], and
        each image's F1 (true boxes found with their class at IoU >= 0.5 against the detections served)."""
        import json

        from visionops.tasks.detection.metrics import image_f1, mean_average_precision, truths

        out = model.predict_canonical(np.asarray(split.images)) if len(split) else None
        index = {c: i for i, c in enumerate(ds.class_names)}
        preds = []
        for row in (out["detections"] if out is not None else []):
            d = json.loads(row)
            preds.append({"boxes": np.asarray(d["boxes"], np.float32).reshape(-1, 4),
                          "scores": np.asarray(d["scores"], np.float32),
                          "labels": np.asarray([index[c] for c in d["labels"]], np.int64)})
        true = truths(split.targets["boxes"], split.targets["box_labels"])
        result = mean_average_precision(preds, true, ds.class_names)
        metrics = {"n": len(split), "map_50": result["map_50"], "map": result["map"], "per_class_ap50": result["per_class_ap50"],
                   "per_class_ap": result["per_class_ap"], "latency_batch_size": cfg.latency_batch_size}
        return metrics, np.array([image_f1(p, t) for p, t in zip(preds, true)], dtype=float)

    def trivial_scores(self, split, ds) -> dict:
        """A detector that finds no box: AP 0 for every class."""
        return {"predictor": "no box", "score": 0.0, "per_class_predictor": "no box",
                "per_class": dict.fromkeys(ds.class_names, 0.0)}

TASK = Detection()
