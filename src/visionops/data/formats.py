"""Writers of the standard detection and segmentation formats (the canvases are stored in them, so that the
embedded data goes through the same readers as a user's folder).

- COCO: root/images/<name>.png and root/annotations.json (bbox xywh, category id = class index + 1, and
  each object's `segmentation` when given: polygons or RLE).
- PNG index masks: root/images/<name>.png, root/masks/<name>.png (class index per pixel, mode L) and
  root/classes.txt (one class name a line, background first).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image


def write_png(path: Path, array: np.ndarray) -> None:
    """An H x W x C (C = 1 or 3) or H x W uint8 array as a PNG (PIL's default, deterministic settings)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array[..., 0] if array.ndim == 3 and array.shape[-1] == 1 else array).save(path)


def write_coco(
    root: Path,
    names: list[str],
    images: np.ndarray,
    boxes: np.ndarray,
    labels: np.ndarray,
    class_names: list[str],
    segmentations: list[list] | None = None,
    annotations: str = "annotations.json",
) -> None:
    """Images N x H x W x C as root/images/<name>.png; boxes N x M x 4 xyxy with labels N x M (-1 pads) and,
    optionally, each object's COCO segmentation (segmentations[i][k]) in root/<annotations>."""
    coco = {
        "images": [],
        "annotations": [],
        "categories": [{"id": c + 1, "name": name} for c, name in enumerate(class_names)],
    }
    for i, name in enumerate(names):
        file_name = f"images/{name}.png"
        write_png(root / file_name, images[i])
        h, w = images[i].shape[:2]
        coco["images"].append({"id": i + 1, "file_name": file_name, "height": int(h), "width": int(w)})
        for k in np.flatnonzero(labels[i] >= 0):
            x0, y0, x1, y1 = (float(v) for v in boxes[i, k])
            ann = {
                "id": len(coco["annotations"]) + 1,
                "image_id": i + 1,
                "category_id": int(labels[i, k]) + 1,
                "bbox": [x0, y0, x1 - x0, y1 - y0],
                "area": (x1 - x0) * (y1 - y0),
                "iscrowd": 0,
            }
            if segmentations is not None:
                ann["segmentation"] = segmentations[i][k]
            coco["annotations"].append(ann)
    (root / annotations).write_text(json.dumps(coco))


def write_index_masks(root: Path, names: list[str], images: np.ndarray, masks: np.ndarray, class_names: list[str]) -> None:
    """Images as root/images/<name>.png, masks N x H x W as root/masks/<name>.png, names in root/classes.txt."""
    for name, image, mask in zip(names, images, masks):
        write_png(root / "images" / f"{name}.png", image)
        write_png(root / "masks" / f"{name}.png", mask)
    (root / "classes.txt").write_text("".join(f"{c}\n" for c in class_names))
