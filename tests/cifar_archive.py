"""Write small archives in the official CIFAR-10 python format, for tests."""

from __future__ import annotations

import io
import pickle
import tarfile
from pathlib import Path

import numpy as np

PREFIX = "cifar-10-batches-py"


def _pickle(obj: dict) -> bytes:
    # The official batches were pickled by Python 2 with numpy 1.x: bytes keys, numpy.core globals.
    return pickle.dumps(obj, protocol=2).replace(b"numpy._core.multiarray", b"numpy.core.multiarray")


def _rows(images: np.ndarray) -> np.ndarray:
    images = np.asarray(images, dtype=np.uint8)
    assert images.ndim == 4 and images.shape[1:] == (32, 32, 3), images.shape
    return np.ascontiguousarray(images.transpose(0, 3, 1, 2).reshape(len(images), 3 * 32 * 32))


def _batch(label: str, images: np.ndarray, labels: np.ndarray) -> bytes:
    return _pickle({
        b"batch_label": label.encode(),
        b"labels": [int(x) for x in labels],
        b"data": _rows(images),
        b"filenames": [f"img_{i}.png".encode() for i in range(len(labels))],
    })


def write_cifar10_archive(
    path: Path | str,
    train_images: np.ndarray,
    train_labels: np.ndarray,
    test_images: np.ndarray,
    test_labels: np.ndarray,
    label_names: list[str],
    batches: int = 5,
    *,
    members: dict[str, bytes] | None = None,
) -> Path:
    """Write a .tar.gz like cifar-10-python.tar.gz; images are N x 32 x 32 x 3 uint8 (HWC).

    The train images are split over `batches` data_batch_* members. `members` adds or replaces
    raw member bytes by name (without the directory), e.g. to build malformed archives.
    """
    files = {
        "batches.meta": _pickle({
            b"label_names": [n.encode() for n in label_names],
            b"num_cases_per_batch": -(-len(train_labels) // max(batches, 1)),
            b"num_vis": 3072,
        }),
    }
    for i, idx in enumerate(np.array_split(np.arange(len(train_labels)), batches), start=1):
        files[f"data_batch_{i}"] = _batch(f"training batch {i} of {batches}", train_images[idx], train_labels[idx])
    files["test_batch"] = _batch("testing batch 1 of 1", test_images, test_labels)
    files["readme.html"] = b"<html>test archive</html>"
    files.update(members or {})

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w:gz") as tar:
        top = tarfile.TarInfo(PREFIX)
        top.type, top.mode = tarfile.DIRTYPE, 0o755
        tar.addfile(top)
        for name, data in files.items():
            info = tarfile.TarInfo(f"{PREFIX}/{name}")
            info.size, info.mode = len(data), 0o644
            tar.addfile(info, io.BytesIO(data))
    return path
