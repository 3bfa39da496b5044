"""A visionops detector as an MLflow pyfunc model: the classifier's raw-image input (base64 PNG/JPEG,
bytes or uint8 arrays; per-row `error`; size and row limits, `serving.pyfunc`), and per row a JSON
`detections` string {"boxes": [[x0, y0, x1, y1], ...] in the input image's pixels, "labels": [class
names], "scores": [...]} decoded with the rule stored in the model file (score and IoU thresholds,
max detections, batched NMS)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
from mlflow.models import ModelSignature
from mlflow.types import ColSpec, Schema

from visionops.data.images import placement
from visionops.serving.pyfunc import ERROR_COLUMN, IMAGE_COLUMN, PREDICT_BATCH, ImageClassifierModel
from visionops.tasks.detection import detector

DETECTIONS_COLUMN = "detections"
COUNT_COLUMN = "count"
SERVED_MODEL_CODE = Path(__file__).with_name("served_model.py")


class ImageDetectorModel(ImageClassifierModel):
    """Serves a visionops detector; the input handling is the classifier's."""

    task = "detection"
    predict_columns = (DETECTIONS_COLUMN,)  # what `visionops predict` writes per file
    answers_in_input_pixels = True

    def load(self, path: str | Path) -> ImageDetectorModel:
        self.model, info = detector.load(path, device="cpu")
        self.class_names: list[str] = list(info["class_names"])
        self.image_shape: tuple[int, int, int] = tuple(int(s) for s in info["image_shape"])
        self.arch: str = info["arch"]
        self.resize: str = info.get("resize", "squash")
        return self

    @property
    def output_columns(self) -> list[str]:
        return [DETECTIONS_COLUMN, COUNT_COLUMN, ERROR_COLUMN]

    def predict_canonical(self, images: np.ndarray, index=None, sizes: list | None = None) -> pd.DataFrame:
        """Detections for canonical uint8 N x H x W x C images; boxes mapped to `sizes` (width, height) per image
        as the stored resize placed it (`images.placement`), or left at the canonical size."""
        h, w, _ = self.image_shape
        dets = detector.predict(self.model, images, batch_size=PREDICT_BATCH)
        sizes = sizes or [(w, h)] * len(dets)
        rows = []
        for d, size in zip(dets, sizes):
            boxes = placement(*size, w, self.resize).boxes_to_source(d["boxes"]) if size else d["boxes"]
            boxes = boxes.astype(np.float32).round(2)
            rows.append(json.dumps({"boxes": boxes.tolist(), "labels": [self.class_names[c] for c in d["labels"]],
                                    "scores": [round(float(s), 4) for s in d["scores"]]}))
        return pd.DataFrame({DETECTIONS_COLUMN: rows, COUNT_COLUMN: np.array([len(d["labels"]) for d in dets], np.int64),
                             ERROR_COLUMN: [""] * len(dets)}, index=index)


def signature() -> ModelSignature:
    return ModelSignature(inputs=Schema([ColSpec("string", IMAGE_COLUMN)]),
                          outputs=Schema([ColSpec("string", DETECTIONS_COLUMN), ColSpec("long", COUNT_COLUMN),
                                          ColSpec("string", ERROR_COLUMN)]))
