"""The default detector reaches the issue's target on the default canvases size (slow: real training)."""

from __future__ import annotations

import pytest
import yaml
from detection_data import write_detection_dataset
from test_detection_preset import CANVASES, PRESET

from visionops.config import parse_params
from visionops.tasks.detection.task import TASK


@pytest.mark.slow
def test_default_teacher_reaches_map50_090_on_1500_canvases(tmp_path):
    raw = yaml.safe_load(PRESET.read_text())
    if not CANVASES:
        raw["data"]["source"] = "digits"  # (only the name; the dataset below is written directly)
    p = parse_params(raw)
    # 1,500 canvases as the pipeline splits them: 10% holdout aside, then val 10%, test 20%, train the rest
    ds = write_detection_dataset(tmp_path / "ds", (("train", 1050), ("val", 150), ("test", 300)))
    TASK.prepare(p, ds, tmp_path / "prep", tmp_path / "reports" / "prepare")
    TASK.train(p, ds, tmp_path / "prep", tmp_path / "teacher.pt", tmp_path / "reports" / "train", tmp_path / "ck.pt")
    m = TASK.evaluate(p, ds, tmp_path / "teacher.pt", tmp_path / "reports" / "evaluate")
    assert m["map_50"] >= 0.90, m
