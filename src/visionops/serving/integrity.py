"""Tamper-evident models: the SHA-256 of a registered model's weights file is recorded when it is logged,
and a served model refuses to load weights that changed since.

The digest is recorded twice: in the logged model itself (`weights_sha256` in its MLmodel metadata, which
travels with the model, so a model loaded from a path or URI without the registry is checked too) and as
the registered version's tag `visionops.weights_sha256`. Whoever can change the weights in the artifact
store can change MLmodel beside them, so the registry tag is the reference whenever the registry is
reachable (a tracking URI is set and a version of the model's run and logged model carries the tag); the
logged digest is used otherwise. A model logged before digests were recorded carries neither and loads
unchecked. Imported by the scoring server: hashlib and mlflow only.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from visionops.errors import InvalidInputError
from visionops.serving.registered import WEIGHTS_SHA256_TAG

WEIGHTS_SHA256 = "weights_sha256"  # key of the digest in the logged model's metadata (MLmodel)


class ChangedModelError(InvalidInputError):
    """A model's weights file is not the one registered: its SHA-256 differs from the recorded one."""


def file_sha256(path: Path | str) -> str:
    """The hex SHA-256 of a file (hashlib reads it in chunks)."""
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def _model_dir(weights: Path) -> Path | None:
    """The logged model folder (holding MLmodel) an artifact lies in."""
    return next((d for d in weights.parents[:3] if (d / "MLmodel").is_file()), None)


def _registry_digest(run_id: str | None, model_id: str | None) -> tuple[str, str] | None:
    """(digest, where it was read) from a registered version of this logged model (MLflow 3's model id, which
    the version names as its source); None when the registry is not configured, cannot be reached, or holds
    no such version with the tag."""
    from mlflow.tracking import MlflowClient
    from mlflow.tracking._tracking_service.utils import is_tracking_uri_set

    if not run_id or not model_id or not is_tracking_uri_set():
        return None
    try:
        versions = MlflowClient().search_model_versions(f"run_id = '{run_id}'")
    except Exception:  # noqa: BLE001  (an unreachable or foreign store: the logged digest is the reference)
        return None
    for v in sorted(versions, key=lambda v: int(v.version), reverse=True):  # one run may log several models
        if WEIGHTS_SHA256_TAG in (v.tags or {}) and model_id in (v.model_id, (v.source or "").removeprefix("models:/")):
            return v.tags[WEIGHTS_SHA256_TAG], f"registry tag {WEIGHTS_SHA256_TAG} of {v.name} v{v.version}"
    return None


def expected_digest(weights: Path) -> tuple[str, str] | None:
    """(the SHA-256 recorded for `weights`, where it was read): the registry's tag when reachable, else
    the logged model's metadata; None for a model that recorded none."""
    from mlflow.models import Model

    model_dir = _model_dir(weights)
    if model_dir is None:
        return None
    model = Model.load(model_dir)
    found = _registry_digest(model.run_id, model.model_id)
    if found is not None:
        return found
    logged = (model.metadata or {}).get(WEIGHTS_SHA256)
    return (logged, f"the logged model's metadata ({model_dir / 'MLmodel'})") if logged else None


def verify_weights(weights: Path | str) -> None:
    """ChangedModelError, in one line naming the file and both digests, when `weights` differs from the
    SHA-256 recorded at registration."""
    weights = Path(weights)
    expected = expected_digest(weights)
    if expected is None:
        return
    actual = file_sha256(weights)
    if actual != expected[0]:
        raise ChangedModelError(
            f"{weights}: SHA-256 {actual} differs from {expected[0]} recorded at registration ({expected[1]}): "
            "the weights were changed after registration; refusing to load them"
        )
