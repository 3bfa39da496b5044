"""A registered segmenter served by a real `mlflow models serve` process answers a PNG with a PNG mask;
and the segmentation preset passes `visionops check`."""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from model_server import model_server
from test_segmentation_stages import CLASS_NAMES, canvases_dataset, params

ROOT = Path(__file__).resolve().parents[1]


def test_preset_passes_check():
    proc = subprocess.run([sys.executable, "-m", "visionops", "check", "--params", str(ROOT / "presets/segmentation.yaml")],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr




@pytest.mark.slow
def test_mlflow_models_serve_returns_png_masks(store, tmp_path):
    import mlflow

    from visionops.data import dataset
    from visionops.serving.pyfunc import encode_png
    from visionops.tasks import get_task
    from visionops.tasks.segmentation.serving import decode_mask

    ds_dir = canvases_dataset(tmp_path / "ds", n=40)
    p, task = params(train={"epochs": 1}), get_task("segmentation")
    task.prepare(p, ds_dir, tmp_path / "prepared", tmp_path)
    task.train(p, ds_dir, tmp_path / "prepared", tmp_path / "teacher.pt", tmp_path, tmp_path / "ck.pt")
    with mlflow.start_run():
        task.log_model(tmp_path / "teacher.pt", "visionops-segmenter", {}, "champion")
    with model_server("models:/visionops-segmenter@champion", store, tmp_path) as base:
        image = np.asarray(dataset.load(ds_dir).splits["test"].images[0])
        wide = np.repeat(image, 2, axis=1)  # 64 x 128: the mask comes back at this size
        body = json.dumps({"dataframe_split": {"columns": ["image"], "data": [[encode_png(wide)], ["bm90IGFuIGltYWdl"]]}}).encode()
        req = urllib.request.Request(f"{base}/invocations", data=body, headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=60) as resp:
            preds = json.loads(resp.read())["predictions"]
        mask = decode_mask(preds[0]["mask"])
        assert mask.shape == (64, 128) and preds[0]["error"] == "" and mask.max() < len(CLASS_NAMES)
        assert preds[0]["classes"].split() == [CLASS_NAMES[c] for c in np.unique(mask)]
        assert preds[1]["mask"] is None and preds[1]["error"].startswith("cannot decode image bytes")

