"""PNG index masks beside the images (segmentation; VOC's SegmentationClass masks are such PNGs).

Layout: data.root/images/<stem>.{png,jpg,jpeg} with data.root/masks/<stem>.png, or the same under
data.root/{train,val,test}/ (the splits are kept; only train is required); and data.root/<data.annotations>
(default classes.txt), one class name a line, background first; a line `# background: none` says the list
has no background (class 0 is a class like the others, e.g. CamVid's sky), `# background: first` is the
default, and any other line starting with `#` is a comment. A mask is a single-channel PNG (mode P or
L) whose value is the class index of each pixel, 255 = ignore (unlabelled or border). Each class present
in a mask counts as one object (semantic masks have no instances; background, when the list has one, is no
object), its box the class's pixels' extent. An
image, mask or class list that resolves outside data.root is refused by name (`visionops.data.roots`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from visionops.config import DataConfig
from visionops.data.changes import file_digests
from visionops.data.dataset import SPLITS
from visionops.data.dense import IGNORE, DenseImage, DenseObject, decode_error, to_source_data
from visionops.data.images import IMAGE_SUFFIXES, read_source_image
from visionops.data.roots import data_roots, resolve_inside
from visionops.data.sources import SourceData
from visionops.errors import InvalidInputError, MissingInputError


def _read_mask(path: Path) -> np.ndarray:
    with Image.open(path) as img:
        if img.mode not in ("P", "L"):
            raise ValueError(f"mask {path.name} is mode {img.mode}; a single-channel index PNG (P or L) is expected")
        return np.asarray(img, dtype=np.uint8)


BACKGROUND = {"first": True, "none": False}  # the values of a class list's `# background:` line


def read_class_list(path: Path) -> tuple[list[str], bool]:
    """(class names, whether the first is background) of a class list; InvalidInputError names the file and line."""
    names, background = [], True
    for n, line in enumerate(path.read_text().splitlines(), 1):
        text = line.strip()
        key, _, value = text.lstrip("#").partition(":")
        if text.startswith("#") and key.strip().lower() == "background":
            if value.strip().lower() not in BACKGROUND:
                raise InvalidInputError(f"{path}:{n}: `# background:` must be one of {', '.join(BACKGROUND)}, "
                                        f"got {value.strip()!r}")
            background = BACKGROUND[value.strip().lower()]
        elif text and not text.startswith("#"):
            names.append(text)
    if len(names) < 2:
        what = "background and at least one class" if background else "at least two classes"
        raise InvalidInputError(f"{path}: needs {what}, got {names}")
    return names, background


def _objects(mask: np.ndarray, class_names: list[str], background: bool) -> list[DenseObject]:
    objects = []
    for v in np.unique(mask):
        if v == IGNORE or (background and v == 0):
            continue
        ys, xs = np.nonzero(mask == v)
        box = (float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1))
        known = v < len(class_names)
        objects.append(DenseObject(str(v), class_names[v] if known else "", int(v) if known else -1, box))
    return objects


def _read_split(folder: Path, prefix: str, class_names: list[str], background: bool, cfg: DataConfig,
                roots: tuple[Path, ...]) -> tuple[list[DenseImage], list[Path]]:
    """The split's images, and the mask files read."""
    records, masks = [], []
    images = resolve_inside(roots, folder / "images", "data.root")
    for f in sorted(p for p in images.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES):
        rec = DenseImage(f"{prefix}images/{f.name}")
        file = resolve_inside(roots, f, "data.root")
        mask_path = resolve_inside(roots, folder / "masks" / f"{f.stem}.png", f"mask of {prefix}images/{f.name}")
        try:
            rec.take(read_source_image(file, cfg.image_size, cfg.channels, cfg.resize, cfg.near_duplicate_hash))
            rec.mask = _read_mask(mask_path)
            masks.append(mask_path)
            rec.objects = _objects(rec.mask, class_names, background)
        except FileNotFoundError:
            rec.error = f"no mask {prefix}masks/{mask_path.name}"
        except Exception as exc:  # noqa: BLE001 - every decoder failure is reported per file
            rec.error = decode_error(exc)
        records.append(rec)
    return records, masks


def load(cfg: DataConfig, targets: str) -> SourceData:
    root = Path(cfg.root).expanduser()
    roots = data_roots(cfg)
    classes = resolve_inside(roots, root / cfg.annotation_file, "data.annotations")
    if not classes.is_file():
        raise MissingInputError(f"data.annotations: no class list {classes} (one name a line, background first)")
    class_names, background = read_class_list(classes)
    named = {s: f"{s}/" for s in SPLITS if (root / s / "images").is_dir()}
    if named and "train" not in named:
        raise InvalidInputError(f"data.root: {root} has {', '.join(named)}/images but no train/images")
    if not named and not (root / "images").is_dir():
        raise MissingInputError(f"data.root: {root} has no images/ folder (nor train/images/)")
    folders = {s: (root / s, prefix) for s, prefix in named.items()} or {"train": (root, "")}
    read = {s: _read_split(folder, prefix, class_names, background, cfg, roots) for s, (folder, prefix) in folders.items()}
    src = to_source_data({s: records for s, (records, _) in read.items()}, class_names, targets, cfg, background)
    src.annotations = file_digests(roots[0], [classes, *(m for _, masks in read.values() for m in masks)])
    return src
