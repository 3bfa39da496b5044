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

from visionops.config import Params

EpochCallback = Callable[[dict], None] | None


class Task(Protocol):
    name: str
    sources: tuple[str, ...]  # the data.source values the task reads
    headline: str  # the metric promotion and monitoring judge by (accuracy, map_50, miou)

    def download(self, params: Params, out_dir: Path, holdout_dir: Path | None) -> dict: ...

    def validate(self, params: Params, dataset_dir: Path, reports_dir: Path) -> dict: ...

    def prepare(self, params: Params, dataset_dir: Path, prepared_dir: Path, reports_dir: Path) -> dict: ...

    def train(self, params: Params, dataset_dir: Path, prepared_dir: Path, model_path: Path, reports_dir: Path,
              checkpoint: Path, on_epoch: EpochCallback = None) -> dict: ...

    def evaluate(self, params: Params, dataset_dir: Path, model_path: Path, reports_dir: Path) -> dict: ...

    def baseline(self, params: Params, dataset_dir: Path, prepared_dir: Path, reports_dir: Path,
                 checkpoints_dir: Path, on_epoch: EpochCallback = None) -> dict: ...

    def distill(self, params: Params, dataset_dir: Path, prepared_dir: Path, teacher_path: Path, student_path: Path,
                reports_dir: Path, checkpoints_dir: Path, baseline_path: Path, on_epoch: EpochCallback = None) -> dict: ...
