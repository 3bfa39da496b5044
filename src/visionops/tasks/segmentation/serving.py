"""A visionops segmenter as an MLflow pyfunc model: the classifier's raw-image input (base64 PNG/JPEG,
bytes or uint8 arrays, one per row), and per row a base64 PNG index mask at the input image's size.

Output columns: `mask` (base64 PNG, 8-bit, pixel value = class index into `class_names`), `classes`
(the class names present in the mask, space-separated), `height`, `width` and `error` (a one-line
reason for a row that is not a usable image, whose other columns are then null). Logged as code
(`served_model.py`): loading never unpickles. Decoding, size limits and packaging are serving/pyfunc's.
"""

from __future__ import annotations

import base64
import io
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from mlflow.models import ModelSignature
from mlflow.types import ColSpec, Schema
from PIL import Image

from visionops.data.images import placement
from visionops.serving import pyfunc
from visionops.tasks.segmentation import segmenter

SERVED_MODEL_CODE = Path(__file__).with_name("served_model.py")
OUTPUT_COLUMNS = ["mask", "classes", "height", "width", pyfunc.ERROR_COLUMN]


def encode_mask(mask: np.ndarray) -> str:
    buf = io.BytesIO()
    Image.fromarray(np.asarray(mask, np.uint8), mode="L").save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def decode_mask(text: str) -> np.ndarray:
    with Image.open(io.BytesIO(base64.b64decode(text))) as img:
        return np.asarray(img, dtype=np.uint8)


class SegmenterModel(pyfunc.ImageClassifierModel):
    """Serves a visionops segmenter; the input handling is the classifier's."""

    task = "segmentation"
    predict_columns = ("mask", "classes")  # what `visionops predict` writes per file
    answers_in_input_pixels = True

    def load(self, path: str | Path) -> SegmenterModel:
        self.model, info = segmenter.load(path, device="cpu")
        self.class_names = list(info["class_names"])
        self.image_shape = tuple(int(s) for s in info["image_shape"])
        self.arch = info["arch"]
        self.resize = info.get("resize", "squash")
        return self

    @property
    def output_columns(self) -> list[str]:
        return OUTPUT_COLUMNS

    @torch.no_grad()
    def predict_canonical(self, images: np.ndarray, index=None, sizes: list | None = None) -> pd.DataFrame:
        """Masks of canonical uint8 N x H x W x C images, each at its `sizes` entry (width, height; the logits of
        the image's part of the square, as the stored resize placed it, resized bilinearly) or at the canonical size."""
        h, w, _ = self.image_shape
        logits = segmenter.predict_logits(self.model, images, "cpu", pyfunc.PREDICT_BATCH)
        rows = []
        for i, size in enumerate(sizes or [None] * len(images)):
            width, height = size or (w, h)
            mask = segmenter.source_mask(logits[i], placement(width, height, w, self.resize))
            rows.append([encode_mask(mask), " ".join(self.class_names[c] for c in np.unique(mask)), height, width, ""])
        return pd.DataFrame(rows, columns=OUTPUT_COLUMNS, index=index, dtype=object)


def signature() -> ModelSignature:
    return ModelSignature(
        inputs=Schema([ColSpec("string", pyfunc.IMAGE_COLUMN)]),
        outputs=Schema([ColSpec("string", "mask"), ColSpec("string", "classes"), ColSpec("long", "height"),
                        ColSpec("long", "width"), ColSpec("string", pyfunc.ERROR_COLUMN)]),
    )


def log_segmenter(model_path: Path, registered_name: str, *, tags: dict, alias: str | None = pyfunc.CHALLENGER,
                  profile=None):
    """Log `model_path` as pyfunc model "model" in the active run, register it as a new version of
    `registered_name`, point `alias` at it and tag it (`pyfunc.log_pyfunc`, as for every task)."""
    _, info = segmenter.load(model_path)  # fails early and clearly on a missing or foreign file
    metadata = {"task": "segmentation", "class_names": list(info["class_names"]), "arch": info["arch"],
                "image_shape": [int(s) for s in info["image_shape"]], "resize": info.get("resize", "squash")}
    return pyfunc.log_pyfunc(model_path, registered_name, code=SERVED_MODEL_CODE, signature=signature(),
                             metadata=metadata, tags=tags, alias=alias, profile=profile)
