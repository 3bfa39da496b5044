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

import mlflow
import numpy as np
import pandas as pd
import torch
from mlflow.models import ModelSignature
from mlflow.types import ColSpec, Schema
from PIL import Image
from torch.nn import functional as F

from visionops.serving import pyfunc
from visionops.tasks.segmentation import segmenter

SERVED_MODEL_CODE = Path(__file__).with_name("served_model.py")
OUTPUT_COLUMNS = ["mask", "classes", "height", "width", pyfunc.ERROR_COLUMN]


def input_size(value) -> tuple[int, int]:
    """(height, width) of an input value as sent (before canonicalisation)."""
    if isinstance(value, str):
        value = pyfunc._b64decode(value)
    if isinstance(value, (bytes, bytearray, memoryview)):
        with Image.open(io.BytesIO(bytes(value))) as img:
            return img.height, img.width
    if isinstance(value, Image.Image):
        return value.height, value.width
    shape = np.asarray(value).shape
    return int(shape[0]), int(shape[1])


def encode_mask(mask: np.ndarray) -> str:
    buf = io.BytesIO()
    Image.fromarray(np.asarray(mask, np.uint8), mode="L").save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def decode_mask(text: str) -> np.ndarray:
    with Image.open(io.BytesIO(base64.b64decode(text))) as img:
        return np.asarray(img, dtype=np.uint8)


class SegmenterModel(mlflow.pyfunc.PythonModel):
    task = "segmentation"
    predict_columns = ("mask", "classes")  # what `visionops predict` writes per file

    def load_context(self, context) -> None:
        self.load(context.artifacts[pyfunc.MODEL_ARTIFACT])

    def load(self, path: str | Path) -> SegmenterModel:
        self.model, info = segmenter.load(path, device="cpu")
        self.class_names = list(info["class_names"])
        self.image_shape = tuple(int(s) for s in info["image_shape"])
        return self

    @torch.no_grad()
    def predict_one(self, image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
        """The class index mask of a canonical H x W x C image, at `size` (logits resized bilinearly)."""
        logits = self.model(torch.from_numpy(np.array(image)).permute(2, 0, 1)[None])
        if tuple(logits.shape[-2:]) != size:
            logits = F.interpolate(logits, size=size, mode="bilinear", align_corners=False)
        return logits[0].argmax(0).to(torch.uint8).numpy()

    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        """Segment images; see the module docstring for the input and output columns."""
        rows, values = pyfunc._rows(model_input)
        if len(values) > pyfunc.MAX_BATCH_ROWS:
            raise pyfunc.RequestError(f"{len(values)} rows in one request; the limit is {pyfunc.MAX_BATCH_ROWS}: split the batch")
        return self.predict_values(values, index=rows if isinstance(model_input, pd.DataFrame) else None)

    def predict_canonical(self, images: np.ndarray, index=None) -> pd.DataFrame:
        """Masks of canonical uint8 N x H x W x C images, at the canonical size (promotion's scoring path)."""
        size = tuple(self.image_shape[:2])
        masks = [self.predict_one(image, size) for image in images]
        return pd.DataFrame([[encode_mask(m), " ".join(self.class_names[c] for c in np.unique(m)), size[0], size[1], ""]
                             for m in masks], columns=OUTPUT_COLUMNS, index=index, dtype=object)

    def predict_values(self, values: list, index=None) -> pd.DataFrame:
        """`predict`'s output for a list of input values (no row limit): each row answered on its own."""
        out = []
        for value in values:
            try:
                image = pyfunc.to_image(value, self.image_shape[0], self.image_shape[2])  # the clear errors
                size = input_size(value)
            except Exception as exc:  # noqa: BLE001  (one bad row is answered alone; PIL raises many kinds)
                out.append([None] * 4 + [" ".join(str(exc).split()) or type(exc).__name__])
                continue
            mask = self.predict_one(image, size)
            present = " ".join(self.class_names[c] for c in np.unique(mask))
            out.append([encode_mask(mask), present, size[0], size[1], ""])
        return pd.DataFrame(out, columns=OUTPUT_COLUMNS, index=index, dtype=object)


def signature() -> ModelSignature:
    return ModelSignature(
        inputs=Schema([ColSpec("string", pyfunc.IMAGE_COLUMN)]),
        outputs=Schema([ColSpec("string", "mask"), ColSpec("string", "classes"), ColSpec("long", "height"),
                        ColSpec("long", "width"), ColSpec("string", pyfunc.ERROR_COLUMN)]),
    )


def log_segmenter(model_path: Path, registered_name: str, *, tags: dict, alias: str | None = pyfunc.CHALLENGER):
    """Log `model_path` as pyfunc model "model" in the active run, register it as a new version of
    `registered_name`, point `alias` at it and tag it (`pyfunc.log_pyfunc`, as for every task)."""
    _, info = segmenter.load(model_path)  # fails early and clearly on a missing or foreign file
    metadata = {"task": "segmentation", "class_names": list(info["class_names"]), "arch": info["arch"],
                "image_shape": [int(s) for s in info["image_shape"]]}
    return pyfunc.log_pyfunc(model_path, registered_name, code=SERVED_MODEL_CODE, signature=signature(),
                             metadata=metadata, tags=tags, alias=alias)
