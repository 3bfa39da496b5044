"""The served model's side of the inference log: one row per image of each `predict_values` call.

`ServedLog.open` (from the pyfunc's `load_context`) finds the log's location: the environment variable
`VISIONOPS_LOG_URI` when set (an empty value turns the log off), else the model metadata `monitor` copied
from params.yaml at registration (a model registered before the log existed has none, and logs nothing).
The network's pooled features and (segmentation) its mean pixel top probability are captured by forward
hooks during the pass the answer runs. Logging never fails or changes an answer: any error building or
writing rows is counted in `stats` and the answer returned as it was.
"""

from __future__ import annotations

import atexit
import os
import sys
import uuid
import weakref
from contextlib import ExitStack, contextmanager
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from visionops.monitoring import embedding, summaries
from visionops.monitoring.inference_log import LogWriter

LOG_URI_ENV = "VISIONOPS_LOG_URI"
MONITOR_METADATA = "monitor"  # the model metadata key of params.yaml `monitor`
NAME_METADATA = "registered_name"  # the model metadata key of the registered model's name
PROJECTION_ARTIFACT = "projection"  # the pyfunc artifacts of the version's embedding projection and reference
REFERENCE_ARTIFACT = "reference"
TTA_PASSES = {"none": 1, "flip": 2, "flip_translate": 6}  # forward passes per batch of a classifier's TTA


def log_uri(monitor: dict | None) -> str | None:
    """Where the log goes: $VISIONOPS_LOG_URI when set ("" = nowhere), else `monitor["log_uri"]`; None = off."""
    if LOG_URI_ENV in os.environ:
        return os.environ[LOG_URI_ENV] or None
    return (monitor or {}).get("log_uri") or None


@contextmanager
def off():
    """No inference log inside (MLflow loads and runs a model it logs, to check its input example)."""
    before = os.environ.get(LOG_URI_ENV)
    os.environ[LOG_URI_ENV] = ""
    try:
        yield
    finally:
        if before is None:
            del os.environ[LOG_URI_ENV]
        else:
            os.environ[LOG_URI_ENV] = before


def _pixel_confidence(logits) -> torch.Tensor:
    """Mean over pixels of the top class probability, per image of N x K x H x W logits."""
    return torch.softmax(logits.detach().float(), dim=1).amax(1).flatten(1).mean(1)


class Watcher:
    """What the answer's forward passes reveal: pooled features (projected) and, for segmentation, the mean
    pixel top probability. Built once per loaded model; its hooks record only inside `watch()`."""

    def __init__(self, served, projection: embedding.Projection | None):
        self.projection = projection
        self.passes = TTA_PASSES.get(getattr(served.model, "tta", "none"), 1)
        self.features = embedding.feature_capture(served.model.net, served.arch) if projection is not None else None
        self.pixels = embedding.Capture(served.model, _pixel_confidence) if served.task == "segmentation" else None

    @contextmanager
    def watch(self):
        """(features list, pixel-confidence list): each gets one tensor per forward pass while inside."""
        with ExitStack() as stack:
            yield tuple(stack.enter_context(c.capture()) if c else None for c in (self.features, self.pixels))

    def embeddings(self, seen: list | None, n: int) -> list | None:
        """The projected embedding of each of the `n` answered rows (None when not captured or misaligned)."""
        if seen is None or self.projection is None:
            return None
        features = embedding.first_passes(seen, self.passes)
        return list(self.projection(features)) if len(features) == n else None


def build_rows(served, images: np.ndarray, errors: list[str], out: pd.DataFrame, *, shapes: list | None,
               embeddings: list | None, pixel_confidence: np.ndarray | None, latency_ms: float,
               model_name: str | None, model_sha256: str | None, request_id: str,
               when: datetime | None = None) -> pd.DataFrame:
    """The log's rows of one answered request: `images` (canonical, N x H x W x C), `errors` ("" = answered),
    `out` (the served model's output frame), `shapes` ((width, height, channels) as sent per row; None: the
    canonical shape), and what the forward passes revealed, for the answered rows in order. A refused row
    has its error and nulls where nothing was measured."""
    n = len(errors)
    good = [i for i, e in enumerate(errors) if not e]
    columns = {"time": [when or datetime.now(timezone.utc)] * n, "request_id": [request_id] * n, "row": list(range(n)),
               "model_name": [model_name] * n, "model_sha256": [model_sha256] * n, "task": [served.task] * n,
               "error": list(errors)}
    if not good:
        return pd.DataFrame(columns)
    h, w, c = images.shape[1:]
    sent = [shapes[i] for i in good] if shapes else [(w, h, c)] * len(good)
    answered = out if len(good) == n else out.iloc[good]
    measured = {"width": [s[0] for s in sent], "height": [s[1] for s in sent], "channels": [s[2] for s in sent],
                **summaries.image_summary(images[good]), "latency_ms": [latency_ms] * len(good)}
    if served.task == "classification":
        measured |= summaries.classification_answers(answered, served.class_names)
    elif served.task == "detection":
        measured |= summaries.detection_answers(answered, served.class_names)
    else:
        measured |= summaries.segmentation_answers(answered, served.class_names, pixel_confidence)
    if embeddings is not None:
        measured["embedding"] = embeddings
    for key, values in measured.items():
        if len(good) == n:
            columns[key] = values
            continue
        full = [None] * n
        for i, value in zip(good, values):
            full[i] = value
        columns[key] = full
    return pd.DataFrame(columns)


class ServedLog:
    """The inference log of one loaded served model: `watch()` around the answer, then `record(...)`."""

    def __init__(self, served, monitor: dict, uri: str, projection: embedding.Projection | None,
                 model_name: str | None, model_sha256: str | None):
        self.served, self.uri, self.model_name, self.model_sha256 = served, uri, model_name, model_sha256
        self.sample = float(monitor.get("sample_images", 0.0)) > 0
        self.watcher = Watcher(served, projection)
        self.writer = LogWriter.from_settings({**monitor, "log_uri": uri})
        self.failed_rows, self.last_build_error = 0, ""
        atexit.register(_close, weakref.ref(self))  # a weak reference: a dropped model's log is not kept alive

    @classmethod
    def open(cls, served, artifacts: dict[str, str]) -> ServedLog | None:
        """The log of a served model loaded from its logged folder (`artifacts`: the pyfunc's); None when
        the log is off or cannot be opened (said on stderr: serving goes on without it)."""
        from mlflow.models import Model

        from visionops.serving.integrity import WEIGHTS_SHA256, _model_dir

        uri = None
        try:
            folder = _model_dir(Path(artifacts["model"]))
            metadata = (Model.load(folder).metadata or {}) if folder else {}
            monitor = metadata.get(MONITOR_METADATA) or {}
            uri = log_uri(monitor or None)
            if uri is None:
                return None
            projection = (embedding.Projection.load(artifacts[PROJECTION_ARTIFACT])
                          if PROJECTION_ARTIFACT in artifacts else None)
            return cls(served, monitor, uri, projection, metadata.get(NAME_METADATA), metadata.get(WEIGHTS_SHA256))
        except Exception as exc:  # noqa: BLE001 - a log that cannot open never stops serving
            print(f"warning: inference log {uri or ''!r} is off: {type(exc).__name__}: {exc}", file=sys.stderr)
            return None

    def watch(self):
        """Around the answer: a context giving the forward passes' (features, pixel confidences)."""
        return self.watcher.watch()

    def record(self, values: list, images: np.ndarray, errors: list[str], shapes: list, out: pd.DataFrame, seen,
               seconds: float) -> None:
        """Build and write the rows of one answered call (`shapes`: each row's (width, height, channels) as sent,
        None where refused); never raises."""
        try:
            n_good = sum(not e for e in errors)
            features, pixels = seen
            frame = build_rows(
                self.served, images, errors, out, shapes=shapes, embeddings=self.watcher.embeddings(features, n_good),
                pixel_confidence=torch.cat(pixels).numpy() if pixels else None,
                latency_ms=1000 * seconds / max(len(errors), 1), model_name=self.model_name,
                model_sha256=self.model_sha256, request_id=uuid.uuid4().hex)
            self.writer.write(frame, raw=[_raw(v) for v in values] if self.sample else None)
        except Exception as exc:  # noqa: BLE001 - logging never fails an answer
            self._failed(len(errors), exc)

    def _failed(self, rows: int, exc: BaseException) -> None:
        self.failed_rows += rows
        self.last_build_error = f"{type(exc).__name__}: {exc}"

    @property
    def stats(self) -> dict:
        """The writer's counters, plus the rows that could not be built (`failed_rows`, `last_build_error`)."""
        return {**self.writer.stats, "failed_rows": self.failed_rows, "last_build_error": self.last_build_error}

    def close(self) -> None:
        """Write what is pending (idempotent; also run at exit)."""
        try:
            self.writer.close()
        except Exception as exc:  # noqa: BLE001
            self._failed(0, exc)


def _close(ref: weakref.ref) -> None:
    log = ref()
    if log is not None:
        log.close()


def _raw(value) -> bytes | None:
    """The encoded image bytes of an input value as received (None for a pixel array)."""
    from visionops.serving.pyfunc import _b64decode

    try:
        return _b64decode(value) if isinstance(value, str) else bytes(value) if isinstance(value, (bytes, bytearray)) else None
    except ValueError:
        return None
