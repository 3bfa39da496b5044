"""Image classification's stage functions (the `Task` protocol): thin calls into this folder's modules."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from visionops.config import Params
from visionops.tasks.base import EpochCallback


class Classification:
    name = "classification"
    targets = None
    headline = "accuracy"
    per_class = "per_class_recall"
    paired = "accuracy"
    paired_test = "mcnemar"

    def download(self, params: Params, out_dir: Path, holdout_dir: Path | None) -> dict:
        from visionops.data.download import run_download

        return run_download(params.data, out_dir, holdout_dir)

    def validate(self, params: Params, dataset_dir: Path, reports_dir: Path) -> dict:
        from visionops.tasks.classification.validate import run_validate

        return run_validate(dataset_dir, params.validate_, reports_dir)

    def label_issues(self, params: Params, dataset_dir: Path, reports_dir: Path) -> dict:
        from visionops.tasks.classification.label_report import run_label_issues

        return run_label_issues(params, dataset_dir, reports_dir)

    def prepare(self, params: Params, dataset_dir: Path, prepared_dir: Path, reports_dir: Path) -> dict:
        from visionops import layout
        from visionops.tasks.classification.prepare import run_prepare

        issues = layout.LABEL_ISSUES_REPORTS / "issues.csv" if params.balance.drop_label_issues else None
        return run_prepare(dataset_dir, params.balance, params.augment, prepared_dir, reports_dir, issues,
                           params.data.label_fraction, params.data.seed)

    def train(self, params: Params, dataset_dir: Path, prepared_dir: Path, model_path: Path, reports_dir: Path,
              checkpoint: Path, on_epoch: EpochCallback = None) -> dict:
        from visionops.tasks.classification.train import recorded_augment, run_train

        return run_train(dataset_dir, prepared_dir, params.train, recorded_augment(prepared_dir), model_path,
                         reports_dir, checkpoint, on_epoch=on_epoch, mlflow_cfg=params.mlflow, data_root=params.data.root)

    def evaluate(self, params: Params, dataset_dir: Path, model_path: Path, reports_dir: Path,
                 holdout_dir: Path | None = None) -> dict:
        from visionops.tasks.classification.evaluate import run_evaluate

        return run_evaluate(dataset_dir, model_path, params.evaluate, reports_dir, params.train.eval_batch_size,
                            params.train.device, holdout_dir)

    def baseline(self, params: Params, dataset_dir: Path, prepared_dir: Path, teacher_path: Path, reports_dir: Path,
                 checkpoints_dir: Path, on_epoch: EpochCallback = None) -> dict:
        from visionops.tasks.classification.baseline import run_baseline
        from visionops.tasks.classification.train import recorded_augment

        return run_baseline(dataset_dir, prepared_dir, params.distill, params.train, recorded_augment(prepared_dir),
                            reports_dir, checkpoints_dir, on_epoch=on_epoch)

    def distill(self, params: Params, dataset_dir: Path, prepared_dir: Path, teacher_path: Path, student_path: Path,
                reports_dir: Path, checkpoints_dir: Path, baseline_path: Path, on_epoch: EpochCallback = None,
                holdout_dir: Path | None = None) -> dict:
        from visionops.tasks.classification.distill import run_distill
        from visionops.tasks.classification.train import recorded_augment

        return run_distill(dataset_dir, prepared_dir, teacher_path, params.distill, params.train,
                           recorded_augment(prepared_dir), student_path, reports_dir, checkpoints_dir,
                           on_epoch=on_epoch, baseline_path=baseline_path, holdout_dir=holdout_dir)

    def log_model(self, model_path: Path, name: str, tags: dict, alias: str | None, profile=None):
        from visionops.serving.pyfunc import log_classifier

        return log_classifier(model_path, name, tags=tags, alias=alias, profile=profile)

    def score_served(self, model, split, ds, cfg) -> tuple[dict, np.ndarray]:
        from visionops.tasks.classification.served_scores import score_served

        return score_served(model, split, ds, cfg)

    def trivial_scores(self, split, ds) -> dict:
        """The accuracy of answering the split's most frequent class; per class, a uniform guess's recall (1/K)
        (the constant answer's recall is 1 on its class and 0 on the others: no floor to set)."""
        labels = np.asarray(split.labels)
        top = np.bincount(labels, minlength=len(ds.class_names)).max() if len(labels) else 0
        return {"predictor": "the most frequent class", "score": float(top / max(len(labels), 1)),
                "per_class_predictor": "a uniform guess", "per_class": dict.fromkeys(ds.class_names, 1 / len(ds.class_names))}


TASK = Classification()
