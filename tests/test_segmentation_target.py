"""The issue's target: the preset's default teacher, trained on the default canvases (presets/segmentation.yaml
as a user gets it), reaches test mIoU >= 0.85, and not by the luck of one seed (before the U-Net scored the
classes at stride 4 as well, seeds 1 and 2 reached 0.81 and 0.82). Minutes of CPU: slow."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from visionops.config import parse_params
from visionops.tasks import get_task

ROOT = Path(__file__).resolve().parents[1]


def _params(seed: int):
    raw = yaml.safe_load((ROOT / "presets/segmentation.yaml").read_text())
    raw["train"].update(device="cpu", seed=seed)
    return parse_params(raw)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """The preset's canvases, downloaded and prepared once for every seed (the seed is train's alone)."""
    root = tmp_path_factory.mktemp("segmentation_target")
    p, task = _params(0), get_task("segmentation")
    task.download(p, root / "dataset", root / "holdout")
    (root / "reports/prepare").mkdir(parents=True)
    task.prepare(p, root / "dataset", root / "prepared", root / "reports/prepare")
    return root


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1])
def test_default_teacher_reaches_the_target_miou_on_the_default_canvases(prepared, tmp_path, seed):
    p, task = _params(seed), get_task("segmentation")
    for name in ("train", "evaluate"):
        (tmp_path / "reports" / name).mkdir(parents=True)
    task.train(p, prepared / "dataset", prepared / "prepared", tmp_path / "teacher.pt", tmp_path / "reports/train", tmp_path / "ckpt.pt")
    metrics = task.evaluate(p, prepared / "dataset", tmp_path / "teacher.pt", tmp_path / "reports/evaluate")
    assert metrics["miou"] >= 0.85, metrics
