"""The issue's target: the preset's default teacher, trained on the default canvases (presets/segmentation.yaml
as a user gets it), reaches test mIoU >= 0.85. Minutes of CPU: slow."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from visionops.config import parse_params
from visionops.tasks import get_task

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_default_teacher_reaches_the_target_miou_on_the_default_canvases(tmp_path):
    raw = yaml.safe_load((ROOT / "presets/segmentation.yaml").read_text())
    raw["train"]["device"] = "cpu"
    p, task = parse_params(raw), get_task("segmentation")
    ds = tmp_path / "dataset"
    task.download(p, ds, tmp_path / "holdout")
    for name in ("prepare", "train", "evaluate"):
        (tmp_path / "reports" / name).mkdir(parents=True)
    task.prepare(p, ds, tmp_path / "prepared", tmp_path / "reports/prepare")
    task.train(p, ds, tmp_path / "prepared", tmp_path / "teacher.pt", tmp_path / "reports/train", tmp_path / "ckpt.pt")
    metrics = task.evaluate(p, ds, tmp_path / "teacher.pt", tmp_path / "reports/evaluate")
    assert metrics["miou"] >= 0.85, metrics
