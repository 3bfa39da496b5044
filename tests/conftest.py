"""Shared fixtures: tiny real datasets and the CIFAR-10 JPEG subset from ../shared/datasets."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from common import CIFAR_JPEG, extract_cifar  # noqa: E402  (bench/common.py: shared with the benchmarks)


@pytest.fixture(scope="session")
def cifar_subset(tmp_path_factory) -> Path:
    """A read-only-by-convention ImageFolder tree of 30 real CIFAR-10 JPEGs per class (copy before editing)."""
    if not CIFAR_JPEG.exists():
        pytest.fail(f"{CIFAR_JPEG} is missing: the real-data tests need the shared CIFAR-10 JPEG archive")
    return extract_cifar(tmp_path_factory.mktemp("cifar"), per_class=30)


@pytest.fixture(autouse=True)
def _restore_mlflow_env():
    """mlflow.set_tracking_uri() exports MLFLOW_TRACKING_URI; keep one test's store out of the next."""
    import os

    before = os.environ.get("MLFLOW_TRACKING_URI")
    yield
    if before is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = before
