"""Shared fixtures: tiny real datasets and the CIFAR-10 JPEG subset from ../shared/datasets."""

from __future__ import annotations

import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CIFAR_JPEG = ROOT.parent / "shared" / "datasets" / "cifar10-jpeg-train.tar.gz"


def extract_cifar_subset(dest: Path, per_class: int) -> Path:
    """Extract the first `per_class` JPEGs of each class into dest/train/<class>/."""
    if not CIFAR_JPEG.exists():
        pytest.fail(f"{CIFAR_JPEG} is missing: the real-data tests need the shared CIFAR-10 JPEG archive")
    taken: dict[str, int] = {}
    with tarfile.open(CIFAR_JPEG) as tar:
        for member in tar:
            parts = Path(member.name).parts
            if not member.isfile() or len(parts) < 3 or parts[-3] != "train":
                continue
            cls = parts[-2]
            if taken.get(cls, 0) >= per_class:
                if len(taken) == 10 and all(v >= per_class for v in taken.values()):
                    break
                continue
            taken[cls] = taken.get(cls, 0) + 1
            target = dest / "train" / cls / parts[-1]
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(tar.extractfile(member).read())
    return dest


@pytest.fixture(scope="session")
def cifar_subset(tmp_path_factory) -> Path:
    """A read-only-by-convention ImageFolder tree of 30 real CIFAR-10 JPEGs per class (copy before editing)."""
    return extract_cifar_subset(tmp_path_factory.mktemp("cifar"), per_class=30)
