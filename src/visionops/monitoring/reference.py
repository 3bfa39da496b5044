"""A model version's reference profile, built at registration: the validation split's log rows.

`build` runs the validation split through the served model once, with the same row-building code the
served model logs with (`served_log.build_rows`), fits the embedding projection (a PCA of the pooled
features of that pass) and adds each image's own headline `score` against its label (classification 1.0 or
0.0 for correct; detection the image's F1 at IoU 0.5; segmentation its pixel accuracy). Both files are the
version's pyfunc artifacts (`projection`: .npz, `reference`: Parquet; nothing pickled), read back with
`load_reference`.
"""

from __future__ import annotations

import importlib
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from visionops.errors import InvalidInputError
from visionops.monitoring import embedding
from visionops.monitoring.inference_log import to_table
from visionops.monitoring.served_log import PROJECTION_ARTIFACT, REFERENCE_ARTIFACT, TTA_PASSES, Watcher, build_rows

SCORE = "score"
SERVED = {"classification": "visionops.serving.pyfunc:ImageClassifierModel",
          "detection": "visionops.tasks.detection.served:ImageDetectorModel",
          "segmentation": "visionops.tasks.segmentation.serving:SegmenterModel"}


@dataclass(frozen=True)
class Profile:
    """What registration stores for the inference log: the pyfunc artifacts and the `monitor` settings."""

    artifacts: dict[str, str]
    settings: dict


def served_model(task: str, model_path: Path):
    """The task's served model (the pyfunc's Python model) loaded from a visionops model file."""
    module, name = SERVED[task].split(":")
    return getattr(importlib.import_module(module), name)().load(model_path)


def build(task: str, model_path: Path, dataset_dir: Path, settings: dict, out_dir: Path,
          model_name: str | None = None) -> Profile:
    """Write `model_path`'s projection and reference (validation split of `dataset_dir`) into `out_dir`;
    `settings`: params.yaml `monitor` as a dict."""
    from visionops.data import dataset
    from visionops.serving.integrity import file_sha256

    served = served_model(task, model_path)
    split = dataset.load(dataset_dir, mmap=False).splits.get("val")
    if split is None or len(split) == 0:
        raise InvalidInputError(f"{dataset_dir}: no validation images to build the reference profile from")
    images = np.asarray(split.images)
    features = embedding.feature_capture(served.model.net, served.arch)  # names an arch without features
    watcher = Watcher(served, None)
    start = time.perf_counter()
    with features.capture() as seen, watcher.watch() as (_, pixels):
        out = served.predict_canonical(images)
    seconds = time.perf_counter() - start
    pooled = embedding.first_passes(seen, TTA_PASSES.get(getattr(served.model, "tta", "none"), 1))
    projection = embedding.fit_projection(pooled, int(settings["embedding_dim"]))
    rows = build_rows(served, images, [""] * len(images), out, shapes=None, embeddings=list(projection(pooled)),
                      pixel_confidence=np.concatenate([p.numpy() for p in pixels]) if pixels else None,
                      latency_ms=1000 * seconds / len(images), model_name=model_name,
                      model_sha256=file_sha256(model_path), request_id="reference")
    table = to_table(rows).append_column(SCORE, pa.array(scores(task, served, out, split), pa.float32()))
    out_dir.mkdir(parents=True, exist_ok=True)
    projection.save(out_dir / "projection.npz")
    pq.write_table(table, out_dir / "reference.parquet")
    return Profile({PROJECTION_ARTIFACT: str(out_dir / "projection.npz"),
                    REFERENCE_ARTIFACT: str(out_dir / "reference.parquet")}, dict(settings))


def scores(task: str, served, out: pd.DataFrame, split) -> np.ndarray:
    """Each image's headline measure against its label, from the served model's answers `out`."""
    if task == "classification":
        return (out["label_index"].to_numpy() == np.asarray(split.labels)).astype(np.float32)
    if task == "detection":
        from visionops.tasks.detection.metrics import image_f1, truths

        index = {c: i for i, c in enumerate(served.class_names)}
        preds = [{"boxes": np.asarray(d["boxes"], np.float32).reshape(-1, 4), "scores": np.asarray(d["scores"], np.float32),
                  "labels": np.asarray([index[c] for c in d["labels"]], np.int64)}
                 for d in map(json.loads, out["detections"])]
        true = truths(split.targets["boxes"], split.targets["box_labels"])
        return np.array([image_f1(p, t) for p, t in zip(preds, true)], np.float32)
    from visionops.tasks.segmentation.segmenter import IGNORE
    from visionops.tasks.segmentation.serving import decode_mask

    result = []
    for text, truth in zip(out["mask"], np.asarray(split.targets["masks"])):
        counted = truth != IGNORE
        result.append((decode_mask(text)[counted] == truth[counted]).mean() if counted.any() else 1.0)
    return np.array(result, np.float32)


def load_reference(model_uri: str) -> pd.DataFrame:
    """The reference profile stored with the model at `model_uri` (models:/name/version, models:/name@alias,
    runs:/..., a local folder): the log schema's columns plus `score`."""
    import tempfile

    import yaml
    from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

    repo = get_artifact_repository(model_uri)
    with tempfile.TemporaryDirectory(prefix="visionops-reference-") as tmp:
        mlmodel = yaml.safe_load(Path(repo.download_artifacts("MLmodel", tmp)).read_text())
        artifacts = mlmodel.get("flavors", {}).get("python_function", {}).get("artifacts", {})
        if REFERENCE_ARTIFACT not in artifacts:
            raise InvalidInputError(f"{model_uri}: the model has no {REFERENCE_ARTIFACT!r} artifact "
                                    "(registered before the inference log existed: register it again)")
        return pq.read_table(repo.download_artifacts(artifacts[REFERENCE_ARTIFACT]["path"], tmp)).to_pandas()
