"""A registered detector served by a real `mlflow models serve` process answers raw PNGs with boxes in
the input image's pixels, class names and scores: the same detections as the model file in process."""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from detection_data import write_detection_dataset
from model_server import model_server, post
from PIL import Image

from visionops.config import DetectionConfig
from visionops.tasks.detection import detector
from visionops.tasks.detection.task import TASK

NAME = "visionops-detector"
CLASSES = [str(d) for d in range(10)]


@pytest.fixture()
def model_file(tmp_path) -> Path:
    """An untrained (seeded) detector whose rule keeps its 5 best peaks: a deterministic answer to compare."""
    torch.manual_seed(0)
    rule = DetectionConfig(score_threshold=0.0, max_detections=5)
    model = detector.build("centernet_tiny", CLASSES, (64, 64, 1), [0.3], [0.2], rule)
    path = tmp_path / "teacher.pt"
    detector.save(path, model.eval(), "centernet_tiny", CLASSES, (64, 64, 1))
    return path


@pytest.fixture()
def store(tmp_path, monkeypatch) -> str:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)
    exp = mlflow.create_experiment("det", artifact_location=(tmp_path / "artifacts").as_uri())  # not ./mlruns
    mlflow.set_experiment(experiment_id=exp)
    return uri


def _png_b64(image: np.ndarray) -> str:
    buf = io.BytesIO()
    Image.fromarray(image.squeeze(-1)).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()






def test_log_model_and_score_use_the_served_rule(store, model_file, tmp_path):
    with mlflow.start_run():
        mv = TASK.log_model(model_file, NAME, tags={"stage": "test"}, alias="challenger")
    assert str(mv.version) == "1" and mv.tags["stage"] == "test"
    from visionops.config import EvaluateConfig
    from visionops.data import dataset

    ds = dataset.load(write_detection_dataset(tmp_path / "ds", (("train", 4), ("val", 4), ("test", 6))))
    served = mlflow.pyfunc.load_model(f"models:/{NAME}@challenger").unwrap_python_model()
    metrics, f1 = TASK.score_served(served, ds.splits["test"], ds, EvaluateConfig())
    assert metrics["n"] == 6 and 0.0 <= metrics["map_50"] <= 1.0
    assert f1.shape == (6,) and ((f1 >= 0) & (f1 <= 1)).all()  # each image's F1, promotion's paired measure


@pytest.mark.slow
def test_mlflow_models_serve_detects_in_input_pixels(store, model_file, tmp_path):
    with mlflow.start_run():
        TASK.log_model(model_file, NAME, tags={}, alias="champion")
    with model_server(f"models:/{NAME}@champion", store, tmp_path) as base:
        from visionops.data.canvases import make_canvases

        canvas = make_canvases(1, 64, seed=5).images[0]
        big = np.asarray(Image.fromarray(canvas.squeeze(-1)).resize((128, 96), Image.BILINEAR))[..., None]
        rows = [[_png_b64(canvas)], ["bm90IGFuIGltYWdl"], [_png_b64(big)]]
        status, body = post(f"{base}/invocations", {"dataframe_split": {"columns": ["image"], "data": rows}})
        assert status == 200, body
        first, bad, scaled = body["predictions"]
        assert bad["error"].startswith("cannot decode image bytes") and bad["detections"] is None
        model, _ = detector.load(model_file)
        expect = detector.predict(model, canvas[None])[0]
        got = json.loads(first["detections"])
        assert first["error"] == "" and first["count"] == 5
        assert got["labels"] == [CLASSES[c] for c in expect["labels"]]
        np.testing.assert_allclose(got["boxes"], expect["boxes"], atol=0.01)
        np.testing.assert_allclose(got["scores"], expect["scores"], atol=1e-4)
        # a 128 x 96 input: boxes come back in its pixels (x doubled, y * 1.5)
        big_boxes = np.asarray(json.loads(scaled["detections"])["boxes"])
        resized = detector.predict(model, np.asarray(Image.fromarray(big.squeeze(-1)).resize((64, 64), Image.BILINEAR))[None, ..., None])[0]
        np.testing.assert_allclose(big_boxes, resized["boxes"] * np.array([2, 1.5, 2, 1.5]), atol=0.02)
        assert big_boxes[:, [0, 2]].max() <= 128 and big_boxes[:, [1, 3]].max() <= 96

