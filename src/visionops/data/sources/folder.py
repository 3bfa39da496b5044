"""A user's ImageFolder tree: `root/<class>/<image>`, or `root/{train,val,test}/<class>/<image>`.

Each image is named by its path relative to data.root (the dataset holds no absolute path) and identified by
a digest of its file's bytes (`Split.identities`). Every file and folder is resolved and refused when it leads
outside data.root (`visionops.data.roots`); a symlinked folder inside it is not walked into.
"""

from __future__ import annotations

import os
import sys
from concurrent.futures import ProcessPoolExecutor
from functools import partial
from pathlib import Path

import numpy as np
from tqdm import tqdm

from visionops.config import DataConfig
from visionops.data.dataset import Rejected, Split
from visionops.data.images import IMAGE_SUFFIXES, read_source_image
from visionops.data.roots import data_roots, files_inside
from visionops.data.sources import SourceData
from visionops.errors import InvalidInputError, MissingInputError

SPLIT_DIRS = ("train", "val", "test")
PARALLEL_THRESHOLD = 2000


def _split_roots(root: Path) -> dict[str, Path]:
    """Map split names to their class-folder roots."""
    named = {s: root / s for s in SPLIT_DIRS if (root / s).is_dir()}
    if not named:
        return {"train": root}
    if "train" not in named:
        raise InvalidInputError(f"{root}: has {', '.join(named)}/ but no train/ subfolder")
    return named


def _class_names(split_root: Path) -> list[str]:
    names = sorted(p.name for p in split_root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not names:
        raise InvalidInputError(f"{split_root}: no class folders (expected {split_root}/<class>/<image>)")
    return names


def _decode(name: str, root: Path, image_size: int, channels: int, resize: str, near_hash: str):
    """(`SourceImage`, None) or (None, error) for the file `name` under `root`."""
    path = root / name
    try:
        return read_source_image(path, image_size, channels, resize, near_hash), None
    except Exception as exc:  # noqa: BLE001 - every decoder failure is reported per file
        return None, f"{type(exc).__name__}: {exc}".replace(str(path), name)


def _decode_all(paths: list[str], root: Path, cfg: DataConfig, desc: str) -> list:
    work = partial(_decode, root=root, image_size=cfg.image_size, channels=cfg.channels, resize=cfg.resize,
                   near_hash=cfg.near_duplicate_hash)
    bar = dict(total=len(paths), desc=desc, unit="img", disable=None, file=sys.stderr)
    if len(paths) < PARALLEL_THRESHOLD or (os.cpu_count() or 1) == 1:
        return [work(p) for p in tqdm(paths, **bar)]
    with ProcessPoolExecutor() as pool:
        return list(tqdm(pool.map(work, paths, chunksize=256), **bar))


def load(cfg: DataConfig) -> SourceData:
    root = Path(cfg.root).expanduser()
    if not root.is_dir():
        raise MissingInputError(f"data.root: {root} is not a directory")
    allowed = data_roots(cfg)
    roots = _split_roots(root)
    class_names = _class_names(roots["train"])
    index = {name: i for i, name in enumerate(class_names)}
    splits, rejected, ignored = {}, [], []
    for split, split_root in roots.items():
        extra = sorted(set(_class_names(split_root)) - set(index))
        if extra:
            raise InvalidInputError(f"{split_root}: class folders {extra} are not in {roots['train']}")
        files, labels = [], []
        for name in class_names:
            class_dir = split_root / name
            if not class_dir.is_dir():
                continue
            for f, _ in files_inside(allowed, class_dir, "data.root"):
                if f.name.startswith("."):
                    continue
                if f.suffix.lower() in IMAGE_SUFFIXES:
                    files.append(f.relative_to(root).as_posix())
                    labels.append(index[name])
                else:
                    ignored.append(str(f))
        decoded = _decode_all(files, root, cfg, f"decode {split}")
        keep = [i for i, (read, _) in enumerate(decoded) if read is not None]
        rejected += [Rejected(split, labels[i], files[i], err) for i, (_, err) in enumerate(decoded) if err]
        shape = (0, cfg.image_size, cfg.image_size, cfg.channels)
        read = [decoded[i][0] for i in keep]
        splits[split] = Split(
            images=np.stack([r.image for r in read]) if read else np.zeros(shape, np.uint8),
            labels=np.asarray([labels[i] for i in keep], dtype=np.int64),
            paths=[files[i] for i in keep],
            orig_shapes=[r.orig for r in read],
            identities=[r.identity for r in read],
            sha256=[r.sha256 for r in read],
            near_hashes=[r.near_hash for r in read],
        )
    if ignored:
        print(
            f"download: ignored {len(ignored)} non-image file(s) (only {sorted(IMAGE_SUFFIXES)} are read), "
            f"e.g. {ignored[:3]}",
            file=sys.stderr,
        )
    return SourceData(class_names, splits, rejected, ignored)
