"""presets/detection.yaml is a complete params.yaml that `visionops check` accepts."""

from __future__ import annotations

import subprocess
import sys
import typing
from pathlib import Path

import pytest
import yaml

from visionops.config import DataConfig, parse_params

PRESET = Path(__file__).resolve().parents[1] / "presets" / "detection.yaml"
CANVASES = "canvases" in typing.get_args(DataConfig.model_fields["source"].annotation)


@pytest.mark.skipif(not CANVASES, reason="data.source 'canvases' is added by the data sources' branch")
def test_visionops_check_accepts_the_detection_preset():
    proc = subprocess.run([sys.executable, "-m", "visionops", "check", "--params", str(PRESET)],
                          capture_output=True, text=True, check=False, cwd=PRESET.parents[1])
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_detection_preset_settings():
    raw = yaml.safe_load(PRESET.read_text())
    assert raw["task"] == "detection" and raw["data"]["image_size"] == 64
    raw["data"]["source"] = "digits" if not CANVASES else raw["data"]["source"]
    p = parse_params(raw)
    assert (p.train.model, p.distill.student, p.balance.strategy) == ("centernet", "centernet_tiny", "repeat_factor")
    assert p.detection.score_threshold == 0.3


def test_a_classification_model_is_rejected_for_detection():
    from visionops.config import ParamsError

    with pytest.raises(ParamsError, match="train.model: resnet20 is a classification model but task is 'detection'"):
        parse_params({"task": "detection", "data": {"source": "canvases"}, "train": {"model": "resnet20"}, "distill": {"student": "centernet_tiny"}})
