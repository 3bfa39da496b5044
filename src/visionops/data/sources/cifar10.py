"""CIFAR-10: 60,000 32x32 colour images in 10 classes, from the official python archive.

The archive is downloaded (MD5-verified) into `data.cache_dir` and read member by member straight
from the tarball, never extracted to disk. Its batches are pickles, so they are loaded with an
unpickler that only admits the few numpy constructors a plain array needs.
"""

from __future__ import annotations

import io
import pickle
import tarfile
import urllib.parse
from pathlib import Path, PurePosixPath

import numpy as np

from visionops.config import DataConfig
from visionops.data.dataset import Split
from visionops.data.fetch import fetch
from visionops.data.images import array_to_canonical, content_hash
from visionops.data.sources import SourceData
from visionops.errors import InvalidInputError

PREFIX = "cifar-10-batches-py"
TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_BATCH = "test_batch"
META = "batches.meta"
SIDE = 32
ORIG_SHAPE = (SIDE, SIDE, 3)
LUMA = np.array([19595, 38470, 7471], dtype=np.uint32)  # ITU-R 601-2, 16-bit fixed point, as PIL "L"

_ALLOWED = {
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy._core.numeric", "_frombuffer"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("_codecs", "encode"),
}


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickle dicts, lists, strings, numbers and numpy arrays; refuse every other global."""

    def find_class(self, module: str, name: str) -> object:
        if module.startswith("numpy.core."):  # numpy 1.x and Python 2 era pickles
            module = "numpy._core." + module.removeprefix("numpy.core.")
        if (module, name) not in _ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load global {module}.{name}")
        return super().find_class(module, name)


def archive_name(url: str) -> str:
    """The archive's file name: the last component of the URL's (or local path's) path."""
    name = PurePosixPath(urllib.parse.unquote(urllib.parse.urlparse(url).path)).name
    return name or "cifar-10-python.tar.gz"


def read_archive(archive: Path | str) -> tuple[list[str], dict[str, tuple[np.ndarray, np.ndarray]]]:
    """Class names and {batch: (uint8 N x 3072 CHW rows, int64 labels)} from the tarball.

    Raises ValueError naming the archive and the member when anything is missing or malformed.
    """
    wanted = {f"{PREFIX}/{m}": m for m in (*TRAIN_BATCHES, TEST_BATCH, META)}
    raw: dict[str, dict] = {}
    try:
        with tarfile.open(archive, mode="r|*") as tar:  # one streaming pass, nothing written
            for member in tar:
                key = wanted.get(member.name.removeprefix("./"))
                if key is None:
                    continue
                if not member.isfile() or key in raw:
                    raise InvalidInputError(f"{archive}: member {member.name} is not a single regular file")
                data = tar.extractfile(member).read()
                raw[key] = _unpickle(archive, member.name, data)
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise InvalidInputError(f"{archive}: not a readable tar archive: {exc}") from exc

    def member(key: str) -> dict:
        if key not in raw:
            raise InvalidInputError(f"{archive}: missing member {PREFIX}/{key}")
        return raw[key]

    names = member(META).get(b"label_names")
    if not isinstance(names, list) or not names:
        raise InvalidInputError(f"{archive}: member {PREFIX}/{META} has no b'label_names' list")
    class_names = [n.decode() if isinstance(n, bytes) else str(n) for n in names]
    batches = {key: _batch(archive, key, member(key), len(class_names)) for key in (*TRAIN_BATCHES, TEST_BATCH)}
    return class_names, batches


def _unpickle(archive: Path | str, name: str, data: bytes) -> dict:
    try:
        obj = _ArrayUnpickler(io.BytesIO(data), encoding="bytes").load()
    except Exception as exc:  # any unpickling failure means a malformed member
        raise InvalidInputError(f"{archive}: member {name} is not a valid pickle: {exc}") from exc
    if not isinstance(obj, dict):
        raise InvalidInputError(f"{archive}: member {name} holds a {type(obj).__name__}, not a dict")
    return obj


def _batch(archive: Path | str, key: str, d: dict, n_classes: int) -> tuple[np.ndarray, np.ndarray]:
    where = f"{archive}: member {PREFIX}/{key}"
    data, labels = d.get(b"data"), d.get(b"labels")
    ok = isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.ndim == 2
    if not ok or data.shape[1] != 3 * SIDE * SIDE:
        got = f"{data.dtype} {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise InvalidInputError(f"{where}: b'data' must be a uint8 N x {3 * SIDE * SIDE} array, got {got}")
    try:
        labels = np.asarray(labels, dtype=np.int64)
    except (TypeError, ValueError) as exc:
        raise InvalidInputError(f"{where}: b'labels' is not a list of integers") from exc
    if labels.shape != (len(data),):
        raise InvalidInputError(f"{where}: {labels.size} labels for {len(data)} images")
    if labels.size and (labels.min() < 0 or labels.max() >= n_classes):
        raise InvalidInputError(f"{where}: labels outside 0..{n_classes - 1}")
    return data, labels


def to_canonical(rows: np.ndarray, image_size: int, channels: int) -> np.ndarray:
    """uint8 N x 3072 CHW rows -> canonical uint8 N x size x size x channels."""
    rgb = rows.reshape(-1, 3, SIDE, SIDE).transpose(0, 2, 3, 1)
    if image_size != SIDE:
        return np.stack([array_to_canonical(np.ascontiguousarray(img), image_size, channels) for img in rgb])
    if channels == 3:
        return np.ascontiguousarray(rgb)
    return ((rgb @ LUMA + 0x8000) >> 16).astype(np.uint8)[..., None]


def _split(batches: dict, keys: tuple[str, ...], cfg: DataConfig) -> Split:
    images = np.concatenate([to_canonical(batches[k][0], cfg.image_size, cfg.channels) for k in keys])
    labels = np.concatenate([batches[k][1] for k in keys])
    paths = [f"{k}:{i}" for k in keys for i in range(len(batches[k][1]))]
    identities = [content_hash(row) for k in keys for row in batches[k][0]]  # the 32x32 RGB source pixels
    return Split(images, labels, paths, [ORIG_SHAPE] * len(labels), identities=identities)


def load(cfg: DataConfig) -> SourceData:
    archive = fetch(cfg.url, Path(cfg.cache_dir) / archive_name(cfg.url), cfg.md5, retries=cfg.download_retries)
    class_names, batches = read_archive(archive)
    splits = {"train": _split(batches, TRAIN_BATCHES, cfg), "test": _split(batches, (TEST_BATCH,), cfg)}
    return SourceData(class_names, splits)
