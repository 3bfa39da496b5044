"""What a task supplies: one function per pipeline stage, plus its registry and serving hooks.

Every stage function takes the validated `Params` and the paths `visionops.layout` names, does its
work with plain arrays and files (no MLflow, no Prefect), writes its outputs atomically and returns
a result dict whose numbers the tracking layer logs. `on_epoch` (train, baseline, distill) is called
with each epoch's row (or None).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Protocol

import numpy as np

from visionops.config import EvaluateConfig, Params
from visionops.data.dataset import Dataset, Split

EpochCallback = Callable[[dict], None] | None


class Task(Protocol):
    name: str
    targets: str | None  # what a dense data source reads per image (data.sources.TARGETS); None: labels only
    headline: str  # the metric promotion and monitoring judge by (accuracy, map_50, miou)
    per_class: str  # the per-class metrics promotion floors (per_class_recall, per_class_ap50, per_class_iou)
    paired: str  # the per-image measure promotion compares on the same images (min_gain, paired test)
    paired_test: str  # promotion's paired test of a gain: mcnemar (right/wrong per image) | wilcoxon (per-image scores)

    def download(self, params: Params, out_dir: Path, holdout_dir: Path | None) -> dict: ...

    def validate(self, params: Params, dataset_dir: Path, reports_dir: Path) -> dict: ...

    def label_issues(self, params: Params, dataset_dir: Path, reports_dir: Path) -> dict:
        """List the train images whose labels are likely wrong (issues.csv, gallery.png, metrics.json in
        `reports_dir`; `visionops.tasks.label_issues_report`), or say why this task lists none."""
        ...

    def prepare(self, params: Params, dataset_dir: Path, prepared_dir: Path, reports_dir: Path) -> dict: ...

    def train(self, params: Params, dataset_dir: Path, prepared_dir: Path, model_path: Path, reports_dir: Path,
              checkpoint: Path, on_epoch: EpochCallback = None) -> dict: ...

    def evaluate(self, params: Params, dataset_dir: Path, model_path: Path, reports_dir: Path,
                 holdout_dir: Path | None = None) -> dict:
        """Measure the model on the test split, and audit it for membership inference against the frozen
        holdout in `holdout_dir` (none: no audit)."""
        ...

    def baseline(self, params: Params, dataset_dir: Path, prepared_dir: Path, teacher_path: Path, reports_dir: Path,
                 checkpoints_dir: Path, on_epoch: EpochCallback = None) -> dict:
        """Train distill.student alone; with distill.init teacher it starts from `teacher_path`'s channels."""
        ...

    def distill(self, params: Params, dataset_dir: Path, prepared_dir: Path, teacher_path: Path, student_path: Path,
                reports_dir: Path, checkpoints_dir: Path, baseline_path: Path, on_epoch: EpochCallback = None,
                holdout_dir: Path | None = None) -> dict:
        """Distil, measure and export the student; its membership audit uses `holdout_dir` as `evaluate`'s does."""
        ...

    def log_model(self, model_path: Path, name: str, tags: dict, alias: str | None, profile=None):
        """Register the model file as a new version of `name` (an MLflow pyfunc serving raw images) with
        `tags` and `alias`, inside the active run, with the inference log's `profile` (`monitoring.reference`)
        when given; return the ModelVersion."""
        ...

    def score_served(self, model, split: Split, ds: Dataset, cfg: EvaluateConfig) -> tuple[dict, np.ndarray]:
        """(metrics with `headline` and `per_class` keys, each image's `paired` measure: right or not for
        mcnemar, a score in [0, 1] for wilcoxon) of a served model (the registered pyfunc's Python model) on
        a split: what promotion and monitoring judge."""
        ...

    def trivial_scores(self, split: Split, ds: Dataset) -> dict:
        """What a predictor that learnt nothing scores on `split`: {"predictor": what it answers, "score": its
        `headline` metric, "per_class_predictor", "per_class": {class: that one's `per_class` metric}}; promotion's
        `auto` gates start from them."""
        ...
