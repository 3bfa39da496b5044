"""The embedded canvases (`visionops.data.canvases`) for detection and segmentation, written in a standard
format and read back through that format's reader, so that a user's data path runs on every `make run`.

Boxes: COCO json + PNG images (read by `coco`); masks: PNG images + PNG index masks (read by `masks`). The
files go to data.cache_dir/canvases-<targets>-<digest of the generation settings>/, written atomically and
reused while the settings are unchanged. A canvas's identity (`Split.identities`) is a digest of its generated
pixels, not of its PNG's bytes, which another zlib would compress differently (nor is the PNG's SHA-256 recorded).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
from PIL import Image

from visionops.atomic import atomic_dir
from visionops.config import DataConfig
from visionops.data.canvases import Canvases, make_canvases
from visionops.data.formats import write_coco, write_index_masks
from visionops.data.images import content_hash
from visionops.data.sources import SourceData, coco, masks

FORMAT = 1  # bump when the written files change for the same settings
DIGITS = [str(d) for d in range(10)]


def _write_boxes(out: Path, names: list[str], canv: Canvases) -> None:
    write_coco(out, names, canv.images, canv.boxes, canv.labels, DIGITS)


def _write_masks(out: Path, names: list[str], canv: Canvases) -> None:
    write_index_masks(out, names, canv.images, canv.masks, ["background", *DIGITS])


# per `targets`: the writer of the standard format, and that format's reader
FORMATS = {"boxes": (_write_boxes, coco), "masks": (_write_masks, masks)}


def folder(cfg: DataConfig, targets: str) -> Path:
    c = cfg.canvases
    settings = {"format": FORMAT, "targets": targets, "count": c.count, "size": c.size, "digits": list(c.digits),
                "digit_size": list(c.digit_size), "seed": cfg.seed}
    digest = hashlib.blake2b(json.dumps(settings, sort_keys=True).encode(), digest_size=8).hexdigest()
    return Path(cfg.cache_dir) / f"canvases-{targets}-{digest}"


def load(cfg: DataConfig, targets: str) -> SourceData:
    write, reader = FORMATS[targets]
    where = folder(cfg, targets)
    if not where.is_dir():  # atomic_dir swaps in only a complete folder
        c = cfg.canvases
        canv = make_canvases(c.count, c.size, cfg.seed, tuple(c.digits), tuple(c.digit_size))
        with atomic_dir(where) as tmp:
            write(tmp, [f"canvas_{i:05d}" for i in range(len(canv))], canv)
    # generated images are split by identity alone, never grouped by perceptual hash (`visionops.data.neardup`)
    as_user_data = cfg.model_copy(update={"source": reader.__name__.rsplit(".", 1)[-1], "root": str(where),
                                          "annotations": None, "near_duplicate_hash": "none"})
    src = reader.load(as_user_data, targets)
    for split in src.splits.values():
        split.identities = [content_hash(_pixels(where / path)) for path in split.paths]
        split.sha256 = []  # generated files, not the user's: nothing to keep from changing
    src.annotations = {}
    return src


def _pixels(png: Path) -> np.ndarray:
    with Image.open(png) as img:
        return np.asarray(img)
