"""A visionops classifier as an MLflow pyfunc model: images in (base64 PNG/JPEG, bytes or uint8
arrays), labels and probabilities out, with the training data's resize (squash or letterbox, as stored in the
model file)/greyscale inside.

The model is logged as code (MLflow models-from-code): loading it runs `served_model.py`, which
builds an `ImageClassifierModel`, and reads the weights with `torch.load(weights_only=True)`;
nothing is unpickled. This module is what the scoring server imports, so it imports only what
serving needs (mlflow, torch, pillow, numpy, pandas) and nothing of the evaluation stack.

Each row of a batch is answered on its own: a bad row gets a one-line reason in the `error` column
(empty for good rows), the others are predicted. Images over `MAX_IMAGE_PIXELS` are refused from
their header, before decoding; requests of more than `MAX_BATCH_ROWS` rows are refused whole with
an MLflow INVALID_PARAMETER_VALUE error, which the scoring server answers with 400 and no traceback.
A request is also refused whole, with 413, when its images hold more than `MAX_REQUEST_BYTES` of encoded
data or more than `MAX_REQUEST_PIXELS` pixels (summed from the headers, before anything is decoded): rows
bound the answer's size, not the work. The limits are constants of this file, which every registered
model carries in its code/ folder, so a served model keeps the limits it was registered with.
"""

from __future__ import annotations

import base64
import binascii
import io
import shutil
import tempfile
import time
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import torch
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from mlflow.tracking import MlflowClient
from mlflow.types import ColSpec, Schema
from PIL import Image, UnidentifiedImageError

import visionops
from visionops.data.images import array_to_canonical, to_canonical
from visionops.errors import VisionopsError
from visionops.serving import privacy_record
from visionops.serving.integrity import WEIGHTS_SHA256, file_sha256, verify_weights
from visionops.serving.registered import (  # noqa: F401
    CHALLENGER,
    CHAMPION,
    EXPERIMENT_TAG,
    MODEL_MD5_TAG,
    PREVIOUS,
    WEIGHTS_SHA256_TAG,
)
from visionops.tasks.classification import classifier


MODEL_ARTIFACT = "model"  # key of the visionops .pt file in the pyfunc model's artifacts
MODEL_NAME = "model"  # name of the logged pyfunc model inside its run
IMAGE_COLUMN = "image"
PROB_PREFIX = "prob_"
ERROR_COLUMN = "error"
PREDICT_BATCH = 256
MAX_IMAGE_SIDE = 4096
MAX_IMAGE_PIXELS = MAX_IMAGE_SIDE * MAX_IMAGE_SIDE  # refused from the header, before decoding
MAX_BATCH_ROWS = 1024  # rows per request
MAX_REQUEST_PIXELS = 16 * MAX_IMAGE_PIXELS  # decoded pixels per request, read from the image headers
MAX_REQUEST_BYTES = 32 * 2**20  # encoded image data per request (base64 text or bytes, as received)
SERVED_MODEL_CODE = Path(__file__).with_name("served_model.py")  # the models-from-code file


class RegistryError(VisionopsError):
    """A registry operation cannot proceed (no active run, missing alias, wrong model)."""


class ImageInputError(VisionopsError, ValueError):
    """An input row is not a decodable image; the message names the row."""


class RequestError(MlflowException, ImageInputError):
    """The request as a whole is unusable (too many rows, no image column): the scoring server
    answers it with 400 and this message, without a traceback."""

    def __init__(self, message: str):
        super().__init__(message, error_code=INVALID_PARAMETER_VALUE)

    @property
    def message(self) -> str:
        return self._message

    @message.setter
    def message(self, value: str) -> None:
        # MLflow's scoring server rewrites the message as "Failed to predict data '<the whole input's repr>'.
        # Error: <message>"; the message names the problem, and a 1,500-row repr only buries it
        own = getattr(self, "_message", None)
        self._message = own if own is not None and value.endswith(own) else value


class RequestTooLargeError(RequestError):
    """The request's images are over the request budget: the scoring server answers 413 with this message."""

    def get_http_status_code(self) -> int:
        return 413  # MLflow's server answers a raised MlflowException with this


# ------------------------------------------------------------------------------------------
# decoding


class ImageTooLargeError(ValueError):
    """An input image has more than MAX_IMAGE_PIXELS pixels."""


def check_image_size(width: int, height: int) -> None:
    """ImageTooLargeError for an image of more than MAX_IMAGE_PIXELS pixels."""
    if width * height > MAX_IMAGE_PIXELS:
        raise ImageTooLargeError(
            f"image of {width}x{height} pixels is over the limit of {MAX_IMAGE_PIXELS} ({MAX_IMAGE_SIDE}x{MAX_IMAGE_SIDE})"
        )


def decode_image_bytes(data: bytes, image_size: int, channels: int, resize: str = "squash",
                       sent: list | None = None) -> np.ndarray:
    """Decode PNG/JPEG bytes and canonicalise them exactly as `images.decode_file` does; an image
    over MAX_IMAGE_PIXELS is refused from its header (`Image.open` reads only that), before decoding.
    `sent`, when a list, receives the (width, height, channels) the header gives."""
    with Image.open(io.BytesIO(data)) as img:
        check_image_size(*img.size)
        if sent is not None:
            sent.append((*img.size, len(img.getbands())))
        img.load()
        return to_canonical(img, image_size, channels, resize)


def describe_decode_error(exc: BaseException) -> str:
    """A one-line reason an encoded image could not be decoded (without PIL's object reprs)."""
    if isinstance(exc, UnidentifiedImageError):
        return "not a PNG/JPEG image (unrecognised format)"
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def _b64decode(text: str) -> bytes:
    text = text.strip()
    if text.startswith("data:"):  # a data URI: data:image/png;base64,....
        text = text.partition(",")[2]
    text = "".join(text.split())
    text += "=" * (-len(text) % 4)
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        return base64.b64decode(text, altchars=b"-_", validate=True)  # URL-safe; binascii.Error if neither


def _array_image(value, image_size: int, channels: int, resize: str, sent: list | None = None) -> np.ndarray:
    try:
        arr = np.asarray(value)
    except ValueError as exc:  # ragged nested lists
        raise ValueError(f"not a rectangular array ({exc})") from None
    if arr.dtype == object or arr.size == 0:
        raise ValueError("not a rectangular, non-empty array of pixel values")
    if not (arr.ndim == 2 or (arr.ndim == 3 and arr.shape[-1] in (1, 3, 4))):
        raise ValueError(f"array of shape {arr.shape} is not an image (expected H x W or H x W x C with C in 1, 3, 4)")
    check_image_size(arr.shape[1], arr.shape[0])
    if arr.dtype != np.uint8:
        if arr.dtype.kind not in "iuf":
            raise ValueError(f"pixel values of dtype {arr.dtype} (expected uint8 0..255)")
        if not (np.all(np.isfinite(arr)) and np.all(arr == np.round(arr)) and arr.min() >= 0 and arr.max() <= 255):
            raise ValueError("pixel values must be whole numbers in 0..255 (uint8)")
        arr = arr.astype(np.uint8)
    if sent is not None:
        sent.append((arr.shape[1], arr.shape[0], arr.shape[2] if arr.ndim == 3 else 1))
    return array_to_canonical(np.ascontiguousarray(arr), image_size, channels, resize)


def to_image(value, image_size: int, channels: int, resize: str = "squash", sent: list | None = None) -> np.ndarray:
    """One input value (base64 string, encoded bytes, PIL image or pixel array) → canonical uint8 H x W x C
    (`resize`: data.resize, `images.placement`); `sent`, when a list, receives the value's (width, height,
    channels) as sent (from the header, before decoding)."""
    if value is None or (isinstance(value, float) and np.isnan(value)):
        raise ValueError("no image (empty value)")
    if isinstance(value, str):
        try:
            value = _b64decode(value)
        except (binascii.Error, ValueError):
            raise ValueError("string is not base64-encoded image data") from None
    if isinstance(value, (bytes, bytearray, memoryview)):
        try:
            return decode_image_bytes(bytes(value), image_size, channels, resize, sent)
        except ImageTooLargeError:
            raise
        except Exception as exc:  # noqa: BLE001  (PIL raises OSError, SyntaxError, struct.error, ...)
            raise ValueError(f"cannot decode image bytes: {describe_decode_error(exc)}") from None
    if isinstance(value, Image.Image):
        check_image_size(*value.size)
        if sent is not None:
            sent.append((*value.size, len(value.getbands())))
        return to_canonical(value, image_size, channels, resize)
    return _array_image(value, image_size, channels, resize, sent)


def input_size(value) -> tuple[int, int] | None:
    """(width, height) of an input value as sent, before canonicalisation; None when it cannot be
    read (canonicalisation then names the problem)."""
    try:
        if isinstance(value, str):
            value = _b64decode(value)
        if isinstance(value, (bytes, bytearray, memoryview)):
            with Image.open(io.BytesIO(bytes(value))) as img:
                return img.size
        if isinstance(value, Image.Image):
            return value.size
        arr = np.asarray(value)
        return (arr.shape[1], arr.shape[0]) if arr.ndim >= 2 else None
    except Exception:  # noqa: BLE001  (any unreadable value: to_image reports it)
        return None


def check_request_budget(values: list) -> None:
    """RequestTooLargeError when the images of one request hold more than MAX_REQUEST_BYTES of encoded data
    or MAX_REQUEST_PIXELS pixels. Pixels are read from the headers (or an array's shape); nothing is
    decoded, and an image refused on its own row (over MAX_IMAGE_PIXELS, or unreadable) costs nothing."""
    sent = sum(len(v) for v in values if isinstance(v, (str, bytes, bytearray)))
    if sent > MAX_REQUEST_BYTES:
        raise RequestTooLargeError(
            f"{sent} bytes of encoded images in one request; the limit is {MAX_REQUEST_BYTES}: split the batch"
        )
    pixels = 0
    for value in values:
        size = input_size(value)
        if size is not None and size[0] * size[1] <= MAX_IMAGE_PIXELS:
            pixels += size[0] * size[1]
    if pixels > MAX_REQUEST_PIXELS:
        raise RequestTooLargeError(
            f"{pixels} pixels in one request's images; the limit is {MAX_REQUEST_PIXELS} "
            f"({MAX_REQUEST_PIXELS // MAX_IMAGE_PIXELS} images of {MAX_IMAGE_SIDE}x{MAX_IMAGE_SIDE}): split the batch"
        )


def _rows(model_input) -> tuple[list, list]:
    """(row labels, values) of the supported input containers."""
    if isinstance(model_input, pd.DataFrame):
        if IMAGE_COLUMN in model_input.columns:
            col = model_input[IMAGE_COLUMN]
        elif model_input.shape[1] == 1:
            col = model_input.iloc[:, 0]
        else:
            raise RequestError(
                f"expected a column {IMAGE_COLUMN!r} of base64 PNG/JPEG strings or uint8 arrays; "
                f"got columns {list(model_input.columns)}"
            )
        return list(model_input.index), list(col)
    if isinstance(model_input, pd.Series):
        return list(model_input.index), list(model_input)
    if isinstance(model_input, np.ndarray):
        if model_input.dtype == object:
            values = list(model_input.reshape(-1))
        elif model_input.ndim in (3, 4):  # N x H x W or N x H x W x C
            values = list(model_input)
        else:
            raise RequestError(f"a numpy input must be N x H x W x C (or N x H x W); got shape {model_input.shape}")
        return list(range(len(values))), values
    if isinstance(model_input, dict) and IMAGE_COLUMN in model_input:
        values = list(model_input[IMAGE_COLUMN])
        return list(range(len(values))), values
    if isinstance(model_input, (str, bytes, Image.Image)):
        return [0], [model_input]
    if isinstance(model_input, (list, tuple)):
        return list(range(len(model_input))), list(model_input)
    raise RequestError(f"unsupported input of type {type(model_input).__name__}")


# ------------------------------------------------------------------------------------------
# the model


class ImageClassifierModel(mlflow.pyfunc.PythonModel):
    """Serves a visionops classifier: see `predict` for the accepted inputs and the output columns."""

    task = "classification"
    predict_columns = ("label", "probability")  # what `visionops predict` writes per file
    answers_in_input_pixels = False  # boxes and masks: predict_canonical gets each input's size
    served_log = None  # the inference log (`monitoring.served_log`), opened by load_context when on

    def load_context(self, context) -> None:
        from visionops.monitoring.served_log import ServedLog

        verify_weights(context.artifacts[MODEL_ARTIFACT])  # refuses weights changed since registration
        self.load(context.artifacts[MODEL_ARTIFACT])
        self.served_log = ServedLog.open(self, context.artifacts)

    def load(self, path: str | Path) -> ImageClassifierModel:
        """Load the visionops .pt file on the CPU (also usable without MLflow)."""
        self.model, info = classifier.load(path, device="cpu")
        self.class_names: list[str] = list(info["class_names"])
        self.image_shape: tuple[int, int, int] = tuple(int(s) for s in info["image_shape"])
        self.arch: str = info["arch"]
        self.resize: str = info.get("resize", "squash")
        return self

    @property
    def output_columns(self) -> list[str]:
        return ["label", "label_index", "probability", *(PROB_PREFIX + c for c in self.class_names), ERROR_COLUMN]

    def canonical(self, value, sent: list | None = None) -> np.ndarray:
        """One input value → the canonical uint8 H x W x C array the network was trained on (`sent`: `to_image`'s)."""
        return to_image(value, self.image_shape[0], self.image_shape[2], self.resize, sent)

    def canonical_rows(self, values: list, sent: list | None = None) -> tuple[np.ndarray, list[str]]:
        """(N x H x W x C uint8, per-row error): the error is "" or a one-line reason the value is not
        a usable image (its pixels are then zeros). `sent`, when a list, receives each row's (width, height,
        channels) as sent, None for a refused row."""
        h, w, c = self.image_shape
        out = np.zeros((len(values), h, w, c), dtype=np.uint8)
        errors = [""] * len(values)
        for i, value in enumerate(values):
            shape = [] if sent is not None else None
            try:
                out[i] = self.canonical(value, shape)
            except ValueError as exc:
                errors[i] = " ".join(str(exc).split()) or type(exc).__name__
            if sent is not None:
                sent.append(shape[0] if shape and not errors[i] else None)
        return out, errors

    @torch.no_grad()
    def predict_canonical(self, images: np.ndarray, index=None, sizes: list | None = None) -> pd.DataFrame:
        """Predictions for canonical uint8 N x H x W x C images (the shared core of serving and batch use).
        `sizes` (each input's (width, height) as sent) is for tasks that answer in input pixels; a label has none."""
        logits = classifier.predict_logits(self.model, images, torch.device("cpu"), batch_size=PREDICT_BATCH)
        if len(images) == 0:
            logits = torch.empty(0, len(self.class_names))
        probs = torch.softmax(logits.double(), dim=1).numpy()
        idx = probs.argmax(1) if len(probs) else np.empty(0, dtype=np.int64)
        frame = {
            "label": [self.class_names[i] for i in idx],
            "label_index": idx.astype(np.int64),
            "probability": probs.max(1) if len(probs) else np.empty(0),
        }
        for j, name in enumerate(self.class_names):
            frame[PROB_PREFIX + name] = probs[:, j]
        frame[ERROR_COLUMN] = [""] * len(probs)
        return pd.DataFrame(frame, index=index)

    # (the pd.DataFrame hint is one MLflow infers no schema from: the logged signature stays the contract)
    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        """Predict for images (every task's served models take this input).

        `model_input` is a DataFrame with a column "image" (base64 PNG/JPEG strings, raw encoded
        bytes, or uint8 H x W x C arrays / nested lists of any size), or a uint8 N x H x W x C
        array. Each image is converted to greyscale/RGB and resized like the training data.
        Returns `output_columns` (the classifier's: label, label_index, probability (the top one),
        prob_<class> per class) and error: empty for a predicted row; for a row that is not a usable
        image, a one-line reason, with every other column null.
        """
        rows, values = _rows(model_input)
        if len(values) > MAX_BATCH_ROWS:
            raise RequestError(f"{len(values)} rows in one request; the limit is {MAX_BATCH_ROWS}: split the batch")
        check_request_budget(values)
        return self.predict_values(values, index=rows if isinstance(model_input, pd.DataFrame) else None)

    def predict_values(self, values: list, index=None) -> pd.DataFrame:
        """`predict`'s output for a list of input values (no row limit): each row answered on its own,
        the usable ones predicted in batches; the rows go to the inference log when it is on (never failing
        or changing the answer)."""
        log = self.served_log
        if log is None:
            return self._answer(values, index)[0]
        start, sent = time.perf_counter(), []
        with log.watch() as seen:
            out, images, errors = self._answer(values, index, sent)
        log.record(values, images, errors, sent, out, seen, time.perf_counter() - start)
        return out

    def _answer(self, values: list, index=None, sent: list | None = None) -> tuple[pd.DataFrame, np.ndarray, list[str]]:
        """(`predict_values`' output, the canonical images, the per-row errors); `sent`: `canonical_rows`'."""
        sizes = [input_size(v) for v in values] if self.answers_in_input_pixels else None
        images, errors = self.canonical_rows(values, sent)
        good = [i for i, e in enumerate(errors) if not e]
        if len(good) == len(errors):
            return self.predict_canonical(images, index=index, sizes=sizes), images, errors
        out = pd.DataFrame({c: [None] * len(errors) for c in self.output_columns}, dtype=object)  # JSON null
        if good:
            good_sizes = [sizes[i] for i in good] if sizes else None
            out.iloc[good] = self.predict_canonical(images[good], sizes=good_sizes).to_numpy(dtype=object)
        out[ERROR_COLUMN] = errors
        if index is not None:
            out.index = index
        return out, images, errors


# ------------------------------------------------------------------------------------------
# logging and registration


def signature_for(class_names: list[str]) -> ModelSignature:
    inputs = Schema([ColSpec("string", IMAGE_COLUMN)])
    outputs = Schema(
        [ColSpec("string", "label"), ColSpec("long", "label_index"), ColSpec("double", "probability")]
        + [ColSpec("double", PROB_PREFIX + c) for c in class_names]
        + [ColSpec("string", ERROR_COLUMN)]
    )
    return ModelSignature(inputs=inputs, outputs=outputs)


def encode_png(image: np.ndarray) -> str:
    """Base64 of the PNG encoding of a uint8 H x W (x 1|3) array."""
    arr = np.asarray(image, dtype=np.uint8)
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[:, :, 0]
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def pip_requirements(opacus: bool = False) -> list[str]:
    """Pinned, minimal requirements of the served model (local version labels such as +cpu dropped); with
    `opacus`, Opacus too (a DP-SGD model whose batch norms became group norms is rebuilt with it)."""
    from importlib.metadata import version

    import PIL
    from packaging.version import Version

    def base(v: str) -> str:
        return Version(v).base_version

    return [
        f"mlflow=={mlflow.__version__}",
        f"torch=={base(torch.__version__)}",
        f"torchvision=={base(version('torchvision'))}",  # its metadata: importing it takes ~1.5 s
        f"pillow=={PIL.__version__}",
        f"numpy=={np.__version__}",
        f"pandas=={pd.__version__}",
        *([f"opacus=={version('opacus')}"] if opacus else []),
    ]


def _package_copy(dest: Path) -> Path:
    """A clean copy of the visionops source (no caches) to ship in the model's code/ folder."""
    src = Path(visionops.__file__).resolve().parent
    out = dest / "visionops"
    shutil.copytree(src, out, ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "__main__.py"))
    return out


def log_classifier(
    model_path: Path,
    registered_name: str,
    *,
    tags: dict[str, str],
    example_image: np.ndarray | None = None,
    client: MlflowClient | None = None,
    alias: str | None = CHALLENGER,
    profile=None,
) -> ModelVersion:
    """Log `model_path` (a visionops .pt) as pyfunc model "model" in the active run, register it as
    a new version of `registered_name`, point `alias` at it (none when None: a DVC experiment's
    version moves no alias) and tag it (plus run_id); `profile`: as `log_pyfunc`'s.
    """
    _, info = classifier.load(model_path)  # fails early and clearly on a missing/corrupt file
    class_names = list(info["class_names"])
    h, w, c = (int(s) for s in info["image_shape"])
    metadata = {
        "class_names": class_names,
        "image_shape": [h, w, c],
        "arch": info["arch"],
        "temperature": float(info["temperature"]),
        "tta": info["tta"],
        "resize": info.get("resize", "squash"),
    }
    return log_pyfunc(model_path, registered_name, code=SERVED_MODEL_CODE, signature=signature_for(class_names),
                      metadata=metadata, tags=tags, example_image=example_image, client=client, alias=alias,
                      privacy=info.get("privacy"), profile=profile)


def log_pyfunc(
    model_path: Path,
    registered_name: str,
    *,
    code: Path,
    signature: ModelSignature,
    metadata: dict,
    tags: dict[str, str],
    example_image: np.ndarray | None = None,
    client: MlflowClient | None = None,
    alias: str | None = CHALLENGER,
    privacy: dict | None = None,
    profile=None,
) -> ModelVersion:
    """Log `model_path` as pyfunc model "model" of the models-from-code file `code` (any task's) in the
    active run, register it as a new version of `registered_name`, point `alias` at it and tag it; a model
    trained with DP-SGD (`privacy`, from its file) gets its (ε, δ) in the tags and the description. With the
    inference log's `profile` (`monitoring.reference.build`), its projection and reference are artifacts
    and its `monitor` settings metadata: the served model then writes the log."""
    run = mlflow.active_run()
    if run is None:
        raise RegistryError("logging a model needs an active MLflow run (wrap it in mlflow.start_run())")
    model_path = Path(model_path)
    h, w, c = metadata["image_shape"]
    if example_image is None:
        example_image = np.zeros((h, w, c), dtype=np.uint8)
    example = pd.DataFrame({IMAGE_COLUMN: [encode_png(example_image)]})
    sha256 = file_sha256(model_path)
    from visionops.monitoring import served_log
    from visionops.monitoring.served_log import MONITOR_METADATA, NAME_METADATA

    artifacts, metadata = {MODEL_ARTIFACT: str(model_path)}, {**metadata, NAME_METADATA: registered_name}
    if profile is not None:
        artifacts |= profile.artifacts
        metadata[MONITOR_METADATA] = profile.settings
    with tempfile.TemporaryDirectory(prefix="visionops-code-") as tmp, served_log.off():  # the example is no request
        model_info = mlflow.pyfunc.log_model(
            name=MODEL_NAME,
            python_model=str(code),  # models-from-code: loading never unpickles
            artifacts=artifacts,
            code_paths=[str(_package_copy(Path(tmp)))],
            signature=signature,
            input_example=example,
            pip_requirements=pip_requirements(opacus=bool(privacy and privacy["group_norm"])),
            registered_model_name=registered_name,
            metadata={**metadata, WEIGHTS_SHA256: sha256},  # checked on load (`integrity`)
        )
    version = str(model_info.registered_model_version)
    client = client or MlflowClient()
    if alias:
        client.set_registered_model_alias(registered_name, alias, version)
    from visionops.data.fetch import file_md5

    recorded = {MODEL_MD5_TAG: file_md5(model_path), WEIGHTS_SHA256_TAG: sha256}
    if privacy:
        recorded |= privacy_record.tags(privacy)
        client.update_model_version(registered_name, version, description=privacy_record.description(privacy))
    for key, value in {**tags, "run_id": run.info.run_id, **recorded}.items():
        client.set_model_version_tag(registered_name, version, key, str(value))
    return client.get_model_version(registered_name, version)
