"""YOLO txt labels with their data.yaml (detection). No torchvision reader exists for it; the format is one
line per object, so a small parser does.

Layout: data.root/<data.annotations> (default data.yaml) with `names` (a list, or {id: name}) and `train`,
and optionally `val` and `test`: image folders relative to data.root (or to its `path`, when given). Each
image's labels are the .txt of the same stem in the folder that replaces the image folder's last `images`
component by `labels` (images/train/x.jpg -> labels/train/x.txt); a missing .txt means no objects. A line
is `class cx cy w h`, the box centre and size as fractions of the image. A class id not in `names` keeps
class -1 and a box outside [0, 1] stays outside the image: validation fails on both. An image folder, image
or label file that resolves outside data.root is refused by name (`visionops.data.roots`); images are named
relative to data.root.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from visionops.config import DataConfig
from visionops.data.changes import file_digests
from visionops.data.dataset import SPLITS
from visionops.data.dense import DenseImage, DenseObject, decode_error, to_source_data
from visionops.data.images import IMAGE_SUFFIXES, read_source_image
from visionops.data.roots import data_roots, files_inside, resolve_inside
from visionops.data.sources import SourceData
from visionops.errors import InvalidInputError, MissingInputError


def _config(path: Path) -> dict:
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise MissingInputError(f"data.annotations: no {path}") from None
    except yaml.YAMLError as exc:
        raise InvalidInputError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(data, dict) or "names" not in data or "train" not in data:
        raise InvalidInputError(f"{path}: a YOLO data.yaml needs `names` and `train`")
    return data


def _names(path: Path, names) -> dict[int, str]:
    if isinstance(names, list):
        return {i: str(n) for i, n in enumerate(names)}
    if isinstance(names, dict) and all(isinstance(k, int) for k in names) and sorted(names) == list(range(len(names))):
        return {k: str(v) for k, v in names.items()}
    raise InvalidInputError(f"{path}: `names` must be a list or a mapping 0..K-1 -> name")


def _label_file(image: Path) -> Path:
    parts = list(image.parent.parts)
    if "images" not in parts:
        return image.with_suffix(".txt")
    i = len(parts) - 1 - parts[::-1].index("images")
    return Path(*parts[:i], "labels", *parts[i + 1 :], image.stem + ".txt")


def _objects(label_file: Path, names: dict[int, str], h: int, w: int, roots: tuple[Path, ...]) -> list[DenseObject]:
    resolve_inside(roots, label_file, "label file")
    objects = []
    for n, line in enumerate(label_file.read_text().splitlines(), 1):
        if not line.strip():
            continue
        fields = line.split()
        try:
            cls, (cx, cy, bw, bh) = int(fields[0]), (float(v) for v in fields[1:5])
        except (ValueError, IndexError):
            raise InvalidInputError(f"{label_file}:{n}: expected `class cx cy w h`, got {line!r}") from None
        if len(fields) != 5:  # polygon (segment) lines have more
            raise InvalidInputError(f"{label_file}:{n}: expected 5 values `class cx cy w h`, got {len(fields)}")
        # in pixels, to a thousandth (text fractions carry float noise: 48.000023 is the right edge 48)
        box = tuple(round(v, 3) for v in ((cx - bw / 2) * w, (cy - bh / 2) * h, (cx + bw / 2) * w, (cy + bh / 2) * h))
        objects.append(DenseObject(str(cls), names.get(cls, ""), cls if cls in names else -1, box))
    return objects


def load(cfg: DataConfig, targets: str) -> SourceData:
    roots = data_roots(cfg)
    root = roots[0]
    config_path = root / cfg.annotation_file
    config = _config(resolve_inside(roots, config_path, "data.annotations"))
    names = _names(config_path, config["names"])
    base = root / str(config.get("path") or "")
    records, labels = {}, [config_path]
    for s in SPLITS:
        if not config.get(s):
            continue
        folder = resolve_inside(roots, base / str(config[s]), f"{config_path}: {s}")
        if not folder.is_dir():
            raise MissingInputError(f"{config_path}: {s}: {folder} is not a directory")
        records[s] = []
        for f, file in files_inside(roots, folder, f"{config_path}: {s}"):
            if f.suffix.lower() not in IMAGE_SUFFIXES:
                continue
            rec = DenseImage((f.relative_to(root) if f.is_relative_to(root) else f).as_posix())
            try:
                rec.take(read_source_image(file, cfg.image_size, cfg.channels, cfg.resize, cfg.near_duplicate_hash))
            except Exception as exc:  # noqa: BLE001 - every decoder failure is reported per file
                rec.error = decode_error(exc)
            label_file = _label_file(f)
            if not rec.error and label_file.is_file():
                rec.objects = _objects(label_file, names, *rec.orig[:2], roots)
                labels.append(label_file)
            records[s].append(rec)
    src = to_source_data(records, [names[i] for i in range(len(names))], targets, cfg)
    src.annotations = file_digests(root, labels)
    return src
