"""Per-object data (detection and segmentation): what a reader returns, and how it becomes a canonical split.

A dense source (coco, voc, yolo, masks, canvases) reads each image into a `DenseImage`: the canonical
pixels, the source size, its objects (source category, class index or -1 when unknown, box in source
pixels) and, for segmentation, its class mask at the source size. `to_source_data` turns them into
canonical `Split`s (boxes and masks placed in the square as their image, `images.placement`: scaled, and for
letterbox shifted, masks resized nearest and padded IGNORE; the source-size masks kept as `Split.source_masks`) and
keeps the raw facts the validate stage checks; `write_tables` stores those facts beside the split's arrays:

    <split>/objects.csv   per object: index (image), path, object, category, category_name, class_index,
                          x0, y0, x1, y1 (xyxy in source pixels)
    <split>/targets.csv   per image: index, path, objects, mask_height, mask_width, mask_unknown_values

Objects of an unknown class or with a broken box are kept in objects.csv (validation fails on them) and
left out of the canonical `boxes`; mask values outside the class set become 255 (ignore) in `masks`.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from visionops.data.dataset import Rejected, Split
from visionops.data.images import SourceImage, place, placement
from visionops.data.sources import SourceData
from visionops.errors import InvalidInputError

IGNORE = 255  # mask value for pixels no class is learnt from
OBJECT_FIELDS = ["index", "path", "object", "category", "category_name", "class_index", "x0", "y0", "x1", "y1"]
TARGET_FIELDS = ["index", "path", "objects", "mask_height", "mask_width", "mask_unknown_values"]


@dataclass
class DenseObject:
    category: str  # the source's own id or name for the class, as written in the annotation
    category_name: str
    class_index: int  # index into class_names; -1 when the category is not in the class set
    box: tuple[float, float, float, float]  # xyxy in source pixels (nan when the source gives none)


@dataclass
class DenseImage:
    path: str  # relative to data.root: how reports name the file
    image: np.ndarray | None = None  # canonical uint8 H x W x C; None when the file could not be decoded
    orig: tuple[int, int, int] = (0, 0, 0)  # source height, width, channels
    objects: list[DenseObject] = field(default_factory=list)
    mask: np.ndarray | None = None  # segmentation: class index per source pixel
    error: str = ""  # why the image (or its mask) could not be read
    identity: str = ""  # a digest of the source file's bytes (`Split.identities`)
    sha256: str = ""  # the source file's SHA-256 (`Split.sha256`)
    near_hash: str = ""  # its perceptual hash (`Split.near_hashes`)

    def take(self, source: SourceImage) -> None:
        """Keep what `read_source_image` read of this image's file."""
        self.image, self.orig, self.identity, self.sha256 = source.image, source.orig, source.identity, source.sha256
        self.near_hash = source.near_hash


@dataclass
class ImageFacts:
    """What validation needs about one stored image beyond its arrays."""

    objects: list[DenseObject]
    mask_shape: tuple[int, int] | None
    unknown_values: list[int]


def box_is_sane(box: tuple[float, float, float, float], height: int, width: int) -> bool:
    """Finite, positive area, inside the width x height image."""
    x0, y0, x1, y1 = box
    return all(map(math.isfinite, box)) and 0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height


def decode_error(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def _dominant(classes: np.ndarray, counts: np.ndarray | None = None) -> int:
    """The most frequent class (ties: the lowest id); 0 with none."""
    if classes.size == 0:
        return 0
    tally = np.bincount(classes, weights=counts)
    return int(np.argmax(tally))


def _canonical_mask(mask: np.ndarray, n_classes: int, size: int, resize: str) -> tuple[np.ndarray, list[int]]:
    """The mask placed (nearest) in the size x size square as its image (`images.place`; padding IGNORE), values
    outside the class set set to IGNORE; and those values."""
    values = np.unique(mask)
    unknown = [int(v) for v in values if v >= n_classes and v != IGNORE]
    out = mask.astype(np.uint8, copy=True)
    if unknown:
        out[np.isin(mask, unknown)] = IGNORE
    if out.shape != (size, size):
        out = np.asarray(place(Image.fromarray(out), size, Image.Resampling.NEAREST, resize, IGNORE))
    return out, unknown


def to_split(records: list[DenseImage], n_classes: int, targets: str, size: int, channels: int,
             resize: str = "squash", background: bool = True) -> tuple[Split, dict]:
    """The canonical split of the decoded `records`, and {path: ImageFacts} for its tables; an image's class is its
    most frequent object class, or (masks) pixel class with background, when there is one, left out."""
    stored = [r for r in records if r.image is not None and not r.error]
    n = len(stored)
    images = np.stack([r.image for r in stored]) if n else np.zeros((0, size, size, channels), np.uint8)
    labels = np.zeros(n, np.int64)
    facts: dict[str, ImageFacts] = {}
    if targets == "boxes":
        kept = [[o for o in r.objects if o.class_index >= 0 and box_is_sane(o.box, *r.orig[:2])] for r in stored]
        m = max([1, *map(len, kept)])
        boxes = np.zeros((n, m, 4), np.float32)
        box_labels = np.full((n, m), -1, np.int64)
        for i, (r, objs) in enumerate(zip(stored, kept)):
            where = placement(r.orig[1], r.orig[0], size, resize)
            for k, o in enumerate(objs):
                boxes[i, k] = where.boxes_to_canonical(o.box)
                box_labels[i, k] = o.class_index
            labels[i] = _dominant(box_labels[i, : len(objs)])
            facts[r.path] = ImageFacts(r.objects, None, [])
        arrays = {"boxes": boxes, "box_labels": box_labels}
    else:
        masks = np.zeros((n, size, size), np.uint8)
        first = int(background)
        for i, r in enumerate(stored):
            masks[i], unknown = _canonical_mask(r.mask, n_classes, size, resize)
            tally = np.bincount(masks[i].ravel(), minlength=IGNORE + 1)[first:n_classes]
            labels[i] = first + int(np.argmax(tally)) if tally.sum() else 0
            facts[r.path] = ImageFacts(r.objects, tuple(r.mask.shape[:2]), unknown)
        arrays = {"masks": masks}
    source_masks = [_source_mask(r.mask, n_classes) for r in stored] if targets == "masks" else []
    split = Split(images, labels, [r.path for r in stored], [r.orig for r in stored], arrays,
                  [r.identity for r in stored], [r.sha256 for r in stored],
                  [r.near_hash for r in stored], source_masks=source_masks)
    return split, facts


def _source_mask(mask: np.ndarray, n_classes: int) -> np.ndarray:
    """The mask at its source size as uint8, values outside the class set IGNORE (as in the canonical one)."""
    out = mask.astype(np.uint8, copy=True)
    out[(mask >= n_classes) & (mask != IGNORE)] = IGNORE
    return out


def rejected(split: str, records: list[DenseImage], root: str) -> list[Rejected]:
    """The records that could not be read; a decoder's message names the file relative to `root` (data.root),
    as rejected.csv, which DVC hashes, holds no absolute path."""
    prefixes = {f"{Path(root).expanduser()}/", f"{Path(root).expanduser().resolve()}/"}
    out = []
    for r in records:
        if r.image is None or r.error:
            error = r.error or "not decoded"
            for prefix in sorted(prefixes, key=len, reverse=True):
                error = error.replace(prefix, "")
            out.append(Rejected(split, -1, r.path, error))
    return out


def _fmt(v: float) -> str:
    return "" if not math.isfinite(v) else f"{v:g}"


def write_tables(split_dir: Path, split: Split, facts: dict[str, ImageFacts]) -> None:
    """objects.csv and targets.csv of one stored split (rows in the split's image order)."""
    with (split_dir / "objects.csv").open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(OBJECT_FIELDS)
        for i, path in enumerate(split.paths):
            for k, o in enumerate(facts[path].objects):
                writer.writerow([i, path, k, o.category, o.category_name, o.class_index, *map(_fmt, o.box)])
    with (split_dir / "targets.csv").open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(TARGET_FIELDS)
        for i, path in enumerate(split.paths):
            f = facts[path]
            mh, mw = f.mask_shape or ("", "")
            writer.writerow([i, path, len(f.objects), mh, mw, ";".join(map(str, f.unknown_values))])


def to_source_data(records: dict[str, list[DenseImage]], class_names: list[str], targets: str, cfg,
                   background: bool = True) -> SourceData:
    """SourceData of a dense source's records per split, with `targets` (`TARGETS`) in each (cfg: the DataConfig;
    `background`: whether class 0 of masks is background)."""
    splits, facts, rejects = {}, {}, []
    for name, recs in records.items():
        splits[name], split_facts = to_split(recs, len(class_names), targets, cfg.image_size, cfg.channels,
                                             cfg.resize, background)
        clash = facts.keys() & split_facts.keys()
        if clash:
            raise InvalidInputError(f"data.root: file {min(clash)} is listed twice (each image once, please)")
        facts |= split_facts
        rejects += rejected(name, recs, cfg.root)
    return SourceData(class_names, splits, rejects, facts=facts, background=background)
