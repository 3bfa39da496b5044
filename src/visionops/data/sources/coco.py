"""COCO json, read by torchvision's `CocoDetection` through `wrap_dataset_for_transforms_v2` (pycocotools
underneath): boxes for detection; polygons or RLE, composed into a class mask, for segmentation.

Layout: data.root/<data.annotations> (default annotations.json), each image's `file_name` relative to
data.root; or split folders data.root/{train,val,test}/<data.annotations>, `file_name` relative to its split
folder (the splits are kept; only train is required). Classes: the train json's categories sorted by id
(segmentation: "background" first, then those, so a pixel's value is 1 + the category's position). An
annotation whose category is not among them keeps class -1 (validation fails on it). Segmentation: the
objects are painted in the json's order, later over earlier. A `file_name` (or the json itself) that resolves
outside data.root is refused by name (`visionops.data.roots`).
"""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import numpy as np
from PIL import Image

from visionops.config import DataConfig
from visionops.data.changes import file_digests
from visionops.data.dataset import SPLITS
from visionops.data.dense import DenseImage, DenseObject, decode_error, to_source_data
from visionops.data.images import read_source_image
from visionops.data.roots import data_roots, resolve_inside
from visionops.data.sources import SourceData
from visionops.errors import InvalidInputError, MissingInputError


def split_files(root: Path, annotations: str) -> dict[str, tuple[Path, Path]]:
    """{split: (image folder, json)}: split folders when root/train/<annotations> exists, else root itself."""
    named = {s: (root / s, root / s / annotations) for s in SPLITS if (root / s / annotations).is_file()}
    if named:
        if "train" not in named:
            raise InvalidInputError(f"data.root: {root} has {', '.join(named)}/{annotations} but no train/{annotations}")
        return named
    if not (root / annotations).is_file():
        raise MissingInputError(f"data.annotations: no {root / annotations} (nor {root}/train/{annotations})")
    return {"train": (root, root / annotations)}


def _dataset(folder: Path, ann_file: Path, roots: tuple[Path, ...], cfg: DataConfig):
    """torchvision's CocoDetection of `ann_file`, every image's file checked to lie inside `roots` and read once
    (`read_source_image`): canonical pixels, source shape and digests, which `_read` takes from `read`."""
    from torchvision.datasets import CocoDetection

    class Coco(CocoDetection):
        def _load_image(self, id: int) -> Image.Image:
            self.read[id] = read_source_image(self.files[id], cfg.image_size, cfg.channels, cfg.resize, cfg.near_duplicate_hash)
            return Image.new("1", self.read[id].orig[1::-1])  # the size the wrapper's masks need; pixels from `read`

    try:
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
            ds = Coco(str(folder), str(ann_file))
    except (ValueError, KeyError, TypeError) as exc:
        raise InvalidInputError(f"data.annotations: {ann_file} is not a COCO json: {decode_error(exc)}") from exc
    ds.read = {}
    ds.files = {
        id: resolve_inside(roots, folder / str(img["file_name"]), f"{ann_file}: image id {id} file_name")
        for id, img in ds.coco.imgs.items()
    }
    return ds


def _categories(ds, targets: str) -> tuple[list[str], dict[int, int]]:
    cats = sorted(ds.coco.cats.values(), key=lambda c: c["id"])
    offset = 1 if targets == "masks" else 0  # masks: background is class 0
    names = ["background"] * offset + [str(c["name"]) for c in cats]
    return names, {c["id"]: offset + i for i, c in enumerate(cats)}


def _read(ds, prefix: str, index: dict[int, int], cfg: DataConfig, targets: str) -> list[DenseImage]:
    from torchvision.datasets import wrap_dataset_for_transforms_v2

    keys = {"boxes", "labels", "masks"} if targets == "masks" else {"boxes", "labels"}
    wrapped = wrap_dataset_for_transforms_v2(ds, target_keys=keys)
    records = []
    for i, image_id in enumerate(ds.ids):
        file_name = ds.coco.loadImgs(image_id)[0]["file_name"]
        path = prefix + file_name
        try:
            image, target = wrapped[i]
        except Exception as exc:  # noqa: BLE001 - an unreadable image or annotation is reported per file
            records.append(DenseImage(path, error=decode_error(exc)))
            continue
        read = ds.read.pop(image_id)
        h, w = read.orig[:2]
        boxes = target["boxes"].tolist() if "boxes" in target else []
        cats = target["labels"].tolist() if "labels" in target else []
        objects = [
            DenseObject(str(c), str(ds.coco.cats.get(c, {}).get("name", "")), index.get(c, -1), tuple(b))
            for b, c in zip(boxes, cats)
        ]
        rec = DenseImage(path, objects=objects)
        rec.take(read)
        if targets == "masks":
            shape = tuple(target["masks"].shape[1:]) if "masks" in target else (h, w)
            mask = np.zeros(shape, np.uint8)
            for obj, m in zip(objects, target.get("masks", [])):
                if obj.class_index >= 0:
                    mask[m.numpy().astype(bool)] = obj.class_index
            rec.mask = mask
        records.append(rec)
    return records


def load(cfg: DataConfig, targets: str) -> SourceData:
    root = Path(cfg.root).expanduser()
    if not root.is_dir():
        raise MissingInputError(f"data.root: {root} is not a directory")
    files = split_files(root, cfg.annotation_file)
    roots = data_roots(cfg)
    for folder, ann in files.values():
        resolve_inside(roots, ann, "data.annotations")
    datasets = {s: _dataset(folder, ann, roots, cfg) for s, (folder, ann) in files.items()}
    class_names, index = _categories(datasets["train"], targets)
    records = {}
    for s, ds in datasets.items():
        prefix = "" if files[s][0] == root else f"{s}/"
        records[s] = _read(ds, prefix, index, cfg, targets)
    src = to_source_data(records, class_names, targets, cfg)
    src.annotations = file_digests(root, [ann for _, ann in files.values()])
    return src
