"""Shared fixtures: tiny real datasets, images made here with PIL, and the CIFAR-10 JPEGs from ../shared.

Tests that need ../shared/datasets are marked `shared_data` and skipped, with the reason, on a clone
that has no ../shared beside it.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from common import CIFAR_JPEG, extract_cifar  # noqa: E402  (bench/common.py: shared with the benchmarks)

SHARED_FIXTURES = {"cifar_subset"}  # fixtures that read ../shared: a test using one must be marked shared_data
NO_SHARED = f"needs the shared CIFAR-10 JPEG archive {CIFAR_JPEG}, which is absent beside this clone"
CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


def pytest_collection_modifyitems(config, items):
    for item in items:
        marked = item.get_closest_marker("shared_data") is not None
        if SHARED_FIXTURES & set(item.fixturenames) and not marked:
            raise pytest.UsageError(f"{item.nodeid} reads ../shared but is not marked shared_data")
        if marked and not CIFAR_JPEG.exists():
            item.add_marker(pytest.mark.skip(reason=NO_SHARED))


@pytest.fixture(scope="session")
def cifar_subset(tmp_path_factory) -> Path:
    """A read-only-by-convention ImageFolder tree of 30 real CIFAR-10 JPEGs per class (copy before editing)."""
    if not CIFAR_JPEG.exists():
        pytest.skip(NO_SHARED)
    return extract_cifar(tmp_path_factory.mktemp("cifar"), per_class=30)


def write_image_folder(root: Path, classes=CLASSES, per_class: int = 30, size: int = 32, seed: int = 0) -> Path:
    """An ImageFolder tree root/train/<class>/ of real files made with PIL: noisy RGB images whose mean
    colour depends on the class, every third one a PNG, the rest JPEGs; no two files are alike."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for c, cls in enumerate(classes):
        folder = root / "train" / cls
        folder.mkdir(parents=True)
        base = np.array([40 + 17 * c, 200 - 13 * c, 90 + 11 * (c % 5)], dtype=np.int16)
        for i in range(per_class):
            pixels = np.clip(base + rng.integers(-40, 41, (size, size, 3)), 0, 255).astype(np.uint8)
            suffix = "png" if i % 3 == 0 else "jpg"
            Image.fromarray(pixels).save(folder / f"{cls}_{i:03d}.{suffix}")
    return root


@pytest.fixture(scope="session")
def image_folder(tmp_path_factory) -> Path:
    """A read-only-by-convention ImageFolder tree of 10 classes x 30 PIL-made JPEG/PNG files (copy before editing)."""
    return write_image_folder(tmp_path_factory.mktemp("images") / "tree")


@pytest.fixture(scope="session")
def prefect_harness():
    """Prefect's test harness: flows and tasks of this session run against a temporary database."""
    from prefect.testing.utilities import prefect_test_harness

    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    with prefect_test_harness(server_startup_timeout=120):
        yield


_SESSION_TRACKING_URI = os.environ.get("MLFLOW_TRACKING_URI")


@pytest.fixture(autouse=True)
def _restore_mlflow_env():
    """mlflow.set_tracking_uri() exports MLFLOW_TRACKING_URI; keep one test's store out of the next.

    Reset to the session's value after every test, not to the value seen before it: a module-scoped
    fixture (set up before this one) may have exported its store during that test's set-up.
    """
    yield
    if _SESSION_TRACKING_URI is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = _SESSION_TRACKING_URI


@pytest.fixture(scope="session")
def empty_db(tmp_path_factory) -> Path:
    """An MLflow SQLite database with its schema migrated once; tests copy it (migrations are slow)."""
    from mlflow.tracking import MlflowClient

    path = tmp_path_factory.mktemp("mlflow-template") / "mlflow.db"
    MlflowClient(tracking_uri=f"sqlite:///{path}").search_experiments()
    return path


@pytest.fixture
def store(tmp_path, empty_db, monkeypatch) -> str:
    """A fresh SQLite tracking + registry store under tmp_path; the global tracking URI is restored afterwards."""
    import shutil

    import mlflow
    from mlflow.tracking._model_registry import utils as registry_utils
    from mlflow.tracking._tracking_service import utils as tracking_utils

    db = tmp_path / "mlflow.db"
    shutil.copy(empty_db, db)
    uri = f"sqlite:///{db}"
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_REGISTRY_URI", raising=False)
    monkeypatch.setattr(registry_utils, "_registry_uri", None)
    old = tracking_utils._tracking_uri
    mlflow.set_tracking_uri(uri)
    exp = mlflow.create_experiment("test", artifact_location=(tmp_path / "artifacts").as_uri())
    mlflow.set_experiment(experiment_id=exp)
    yield uri
    mlflow.end_run()
    mlflow.set_tracking_uri(old)  # None unsets MLFLOW_TRACKING_URI; monkeypatch then restores the original env


def train_quickly(arch: str, class_names: list[str], split, seed: int, steps: int):
    """A classifier trained for `steps` seeded Adam steps of 64 images on `split` (a dataset.Split)."""
    import torch

    from visionops.tasks.classification import classifier

    torch.manual_seed(seed)
    mean, std = classifier.channel_stats(split.images)
    model = classifier.build(arch, class_names, tuple(split.images.shape[1:]), mean, std)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    x = torch.from_numpy(np.asarray(split.images)).permute(0, 3, 1, 2)
    y = torch.from_numpy(split.labels)
    g = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(steps):
        idx = torch.randint(0, len(y), (64,), generator=g)
        loss = torch.nn.functional.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def corner_images(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """16 x 16 x 1 uint8 images of 3 classes. Class 0: bright square top left; 1: top right; 2: bottom
    middle; on a noisy dark background."""
    out = rng.normal(40, 15, size=(len(labels), 16, 16)).clip(0, 255)
    corners = {0: (1, 1), 1: (1, 10), 2: (10, 5)}
    for i, k in enumerate(labels):
        r, c = corners[int(k)]
        out[i, r : r + 5, c : c + 5] = rng.normal(220, 15, size=(5, 5)).clip(0, 255)
    return out.astype(np.uint8)[..., None]
