"""The canonical on-disk dataset every stage after `download` reads.

`data/dataset` holds the splits train, val and test; the frozen holdout, `data/holdout`, is a
dataset directory of the same format whose only split is "holdout". Layout of a dataset directory:

    meta.json               class names, channels, image size, split sizes, source; "resize": "letterbox" when
                            data.resize letterboxed the images (each image's `Placement` follows from its source
                            shape), "background": false when class 0 of a segmentation is no background
    <split>/images.npy      uint8 array, N x H x W x C (memory-mapped on read)
    <split>/labels.npy      int64 array, N
    <split>/manifest.csv    index, path (the file relative to data.root, or the source's name for the image),
                            orig_height, orig_width, orig_channels, and for a source of user files
                            (folder, coco, voc, yolo, masks) sha256, the file's (see `visionops.data.changes`),
                            and where download grouped near duplicates, group (`Split.groups`)
    <split>/<target>.npy    detection and segmentation only: per-image targets, first axis N (see `Split`)
    test/source_masks.npz   segmentation whose source masks are not the canonical ones: the first test masks at
                            their source size (key: the image's index), up to SOURCE_MASK_PIXELS in all
    rejected.csv            files the source could not decode: split, label, path, error
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from visionops.data.images import Placement, placement
from visionops.errors import InvalidInputError, MissingInputError

SPLITS = ("train", "val", "test")
FORMAT_VERSION = 1
SOURCE_MASK_SPLIT = "test"  # the split evaluate scores at the source resolution
SOURCE_MASK_PIXELS = 2**26  # source-size masks kept at most (64 MiB as uint8, less compressed)


@dataclass
class Split:
    """One split: images (N,H,W,C uint8), labels (N,) and where each image came from.

    Classification's labels are the classes. Other tasks keep their targets in `targets`, every array
    indexed by image on its first axis (detection: boxes N x M x 4 xyxy pixels and box_labels N x M,
    -1 padding; segmentation: masks N x H x W), and `labels` holds each image's dominant class.

    `identities` (not stored) name each image independently of every setting: a digest of the source
    file's bytes, or of the source's own pixels at source resolution. `download` hashes them into the
    splits (`visionops.data.splits`), so that data.image_size and data.channels move no image.
    `near_hashes` (not stored) are the sources' perceptual hashes (`visionops.data.neardup`), "" for none;
    `groups`, where download grouped near duplicates, each image's group identity (stored), else empty.
    """

    images: np.ndarray
    labels: np.ndarray
    paths: list[str]
    orig_shapes: list[tuple[int, int, int]] = field(default_factory=list)
    targets: dict[str, np.ndarray] = field(default_factory=dict)
    identities: list[str] = field(default_factory=list)
    sha256: list[str] = field(default_factory=list)  # each source file's SHA-256; empty for a source of no files
    near_hashes: list[str] = field(default_factory=list)
    groups: list[str] = field(default_factory=list)
    source_masks: list[np.ndarray] = field(default_factory=list)  # segmentation: masks at the source size (a prefix)

    def __len__(self) -> int:
        return len(self.labels)


@dataclass
class Rejected:
    """A source file that could not be decoded; validation reports it."""

    split: str
    label: int
    path: str
    error: str


@dataclass
class Dataset:
    class_names: list[str]
    splits: dict[str, Split]
    source: str
    rejected: list[Rejected] = field(default_factory=list)
    task: str = "classification"
    resize: str = "squash"  # data.resize the images were stored with
    background: bool = True  # segmentation: class 0 is background (transparent in overlays, not an object)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(next(iter(self.splits.values())).images.shape[1:])

    def placements(self, split: str) -> list[Placement]:
        """Where each image of `split` lies in its canonical square (`images.placement`), from its source shape."""
        size = self.image_shape[0]
        return [placement(w, h, size, self.resize) for h, w, _ in self.splits[split].orig_shapes]

    def model_record(self) -> dict:
        """What a model file keeps of the data beyond class names and shape: the resize rule, when not squash."""
        return {"resize": self.resize} if self.resize != "squash" else {}


MANIFEST_FIELDS = ["index", "path", "orig_height", "orig_width", "orig_channels"]
REJECTED_FIELDS = ["split", "label", "path", "error"]


def _write_csv(path: Path, fields: list[str], rows: list[list]) -> None:
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(fields)
        writer.writerows(rows)


def save(ds: Dataset, out: Path) -> None:
    """Write `ds` into the (empty, temporary) directory `out`; callers wrap this in `atomic_dir`."""
    out.mkdir(parents=True, exist_ok=True)
    for name, split in ds.splits.items():
        d = out / name
        d.mkdir()
        np.save(d / "images.npy", np.ascontiguousarray(split.images, dtype=np.uint8))
        np.save(d / "labels.npy", np.asarray(split.labels, dtype=np.int64))
        shapes = split.orig_shapes or [split.images.shape[1:]] * len(split)
        rows = [[i, p, *s] for i, (p, s) in enumerate(zip(split.paths, shapes))]
        extra = [(name, values) for name, values in (("sha256", split.sha256), ("group", split.groups)) if values]
        for _, values in extra:
            rows = [[*row, value] for row, value in zip(rows, values, strict=True)]
        _write_csv(d / "manifest.csv", MANIFEST_FIELDS + [name for name, _ in extra], rows)
        for key, array in split.targets.items():
            np.save(d / f"{key}.npy", np.ascontiguousarray(array))
        if name == SOURCE_MASK_SPLIT and split.source_masks and _differs(split):
            np.savez_compressed(d / "source_masks.npz", **{str(i): m for i, m in enumerate(_bounded(split.source_masks))})
    _write_csv(
        out / "rejected.csv",
        REJECTED_FIELDS,
        [[r.split, r.label, r.path, r.error] for r in ds.rejected],
    )
    meta = {
        "format_version": FORMAT_VERSION,
        "source": ds.source,
        "class_names": ds.class_names,
        "image_shape": list(ds.image_shape),
        "splits": {name: len(s) for name, s in ds.splits.items()},
        "rejected": len(ds.rejected),
    }
    if ds.task != "classification":  # (classification's meta.json predates tasks and keeps its bytes)
        meta["task"] = ds.task
        meta["targets"] = sorted(next(iter(ds.splits.values())).targets)
    if ds.resize != "squash":  # (as the keys below: written only when not the default, so older bytes stay)
        meta["resize"] = ds.resize
    if not ds.background:
        meta["background"] = False
    (out / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")


def _differs(split: Split) -> bool:
    """Whether some source mask is not the stored canonical one (else the canonical masks are the source's)."""
    canonical = split.targets.get("masks")
    return any(m.shape != c.shape or not np.array_equal(m, c) for m, c in zip(split.source_masks, canonical))


def _bounded(masks: list[np.ndarray]) -> list[np.ndarray]:
    """The longest prefix of `masks` within SOURCE_MASK_PIXELS pixels."""
    total = np.cumsum([m.size for m in masks])
    return masks[: int(np.searchsorted(total, SOURCE_MASK_PIXELS, side="right"))]


def source_masks(root: Path | str, split: str = SOURCE_MASK_SPLIT) -> list[np.ndarray]:
    """The masks of `split` at their source size as `save` kept them (a prefix of the split, possibly empty);
    without source_masks.npz the canonical masks are the source's, and those are returned."""
    path = Path(root) / split / "source_masks.npz"
    if not path.is_file():
        return list(np.load(Path(root) / split / "masks.npy"))
    with np.load(path) as kept:
        return [kept[str(i)] for i in range(len(kept.files))]


def _read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as fh:
        return list(csv.DictReader(fh))


def load(root: Path | str, mmap: bool = True) -> Dataset:
    """Open a dataset written by `save`; images are memory-mapped unless `mmap` is False."""
    root = Path(root)
    meta_path = root / "meta.json"
    if not meta_path.exists():
        raise MissingInputError(f"{root}: not a visionops dataset (no meta.json); run `visionops download`")
    meta = json.loads(meta_path.read_text())
    if meta.get("format_version") != FORMAT_VERSION:
        raise InvalidInputError(f"{meta_path}: format_version {meta.get('format_version')} != {FORMAT_VERSION}")
    splits = {}
    for name in meta["splits"]:
        d = root / name
        rows = _read_csv(d / "manifest.csv")
        splits[name] = Split(
            images=np.load(d / "images.npy", mmap_mode="r" if mmap else None),
            labels=np.load(d / "labels.npy"),
            paths=[r["path"] for r in rows],
            orig_shapes=[(int(r["orig_height"]), int(r["orig_width"]), int(r["orig_channels"])) for r in rows],
            targets={key: np.load(d / f"{key}.npy") for key in meta.get("targets", ())},
            sha256=[r["sha256"] for r in rows] if rows and "sha256" in rows[0] else [],
            groups=[r["group"] for r in rows] if rows and "group" in rows[0] else [],
        )
    rejected = [
        Rejected(r["split"], int(r["label"]), r["path"], r["error"]) for r in _read_csv(root / "rejected.csv")
    ]
    return Dataset(meta["class_names"], splits, meta["source"], rejected, meta.get("task", "classification"),
                   meta.get("resize", "squash"), meta.get("background", True))
