"""Folders in the standard detection/segmentation formats, written from the embedded canvases for the tests."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from pycocotools import mask as coco_mask

from visionops.config import DataConfig
from visionops.data.canvases import make_canvases
from visionops.data.formats import write_coco, write_index_masks, write_png

SIZE = 48
DIGITS = [str(d) for d in range(10)]
CANV = make_canvases(24, size=SIZE, seed=3, digits=(1, 3), scale=(14, 22))
NAMES = [f"c_{i:05d}" for i in range(len(CANV))]


def cfg(source: str, root: Path, image_size: int = SIZE, **kw) -> DataConfig:
    """Everything stays in train (no carving), so image i of the folder is train image i."""
    return DataConfig(source=source, root=str(root), image_size=image_size, val_fraction=0.0, test_fraction=0.0,
                      holdout_fraction=0.0, **kw)


def coco_folder(root: Path, segmentations: list[list] | None = None) -> Path:
    write_coco(root, NAMES, CANV.images, CANV.boxes, CANV.labels, DIGITS, segmentations)
    return root


def edit_coco(root: Path, edit) -> None:
    path = root / "annotations.json"
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def rle_segmentations() -> list[list]:
    """Each digit's pixels of its class inside its box, as compressed RLE (recomposes the canvas masks exactly)."""
    out = []
    for i in range(len(CANV)):
        objs = []
        for k in np.flatnonzero(CANV.labels[i] >= 0):
            x0, y0, x1, y1 = CANV.boxes[i, k].astype(int)
            m = np.zeros((SIZE, SIZE), np.uint8)
            m[y0:y1, x0:x1] = CANV.masks[i, y0:y1, x0:x1] == 1 + CANV.labels[i, k]
            rle = coco_mask.encode(np.asfortranarray(m))
            objs.append({"size": rle["size"], "counts": rle["counts"].decode()})
        out.append(objs)
    return out


def voc_folder(root: Path) -> Path:
    for name, image, boxes, labels in zip(NAMES, CANV.images, CANV.boxes, CANV.labels):
        write_png(root / "JPEGImages" / f"{name}.png", image)
        objects = "".join(
            f"<object><name>{labels[k]}</name><difficult>0</difficult><bndbox><xmin>{b[0]:g}</xmin>"
            f"<ymin>{b[1]:g}</ymin><xmax>{b[2]:g}</xmax><ymax>{b[3]:g}</ymax></bndbox></object>"
            for k, b in enumerate(boxes) if labels[k] >= 0
        )
        xml = (f"<annotation><filename>{name}.png</filename><size><width>{SIZE}</width><height>{SIZE}</height>"
               f"<depth>1</depth></size>{objects}</annotation>")
        (root / "Annotations").mkdir(parents=True, exist_ok=True)
        (root / "Annotations" / f"{name}.xml").write_text(xml)
    (root / "labels.txt").write_text("\n".join(DIGITS) + "\n")
    return root


def yolo_folder(root: Path) -> Path:
    (root / "labels" / "train").mkdir(parents=True)
    for name, image, boxes, labels in zip(NAMES, CANV.images, CANV.boxes, CANV.labels):
        write_png(root / "images" / "train" / f"{name}.png", image)
        lines = []
        for b, c in zip(boxes, labels):
            if c >= 0:
                cx, cy, w, h = (b[0] + b[2]) / 2 / SIZE, (b[1] + b[3]) / 2 / SIZE, (b[2] - b[0]) / SIZE, (b[3] - b[1]) / SIZE
                lines.append(f"{c} {cx:.6f} {cy:.6f} {w:.6f} {h:.6f}")
        (root / "labels" / "train" / f"{name}.txt").write_text("\n".join(lines) + "\n")
    (root / "data.yaml").write_text("train: images/train\nnames: [" + ", ".join(f"'{d}'" for d in DIGITS) + "]\n")
    return root


def masks_folder(root: Path) -> Path:
    write_index_masks(root, NAMES, CANV.images, CANV.masks, ["background", *DIGITS])
    return root
