"""Data sources for `download`, keyed by `data.source`.

A source turns `DataConfig` into `SourceData`: canonical uint8 N x H x W x C splits ("train", and
"test"/"val" when the source has them) plus the files it could not decode. `download` carves the
missing splits and writes the canonical dataset.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field

from visionops.config import DataConfig
from visionops.data.dataset import Rejected, Split


@dataclass
class SourceData:
    class_names: list[str]
    splits: dict[str, Split]
    rejected: list[Rejected] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)  # non-image files, reported not read
    facts: dict = field(default_factory=dict)  # dense sources: {path: visionops.data.dense.ImageFacts}
    # dense sources: the annotation files read (json, xml, labels, masks, class lists), {path: SHA-256}
    annotations: dict[str, str] = field(default_factory=dict)
    background: bool = True  # masks: whether class 0 is background (`masks.read_class_list`)


_MODULES = {"digits": "digits", "cifar10": "cifar10", "folder": "folder"}
# Sources with per-object targets: their load also takes which targets the task asks for.
_DENSE_MODULES = {"canvases": "canvases", "coco": "coco", "voc": "voc", "yolo": "yolo", "masks": "masks"}
# What a dense source reads per image, as the task asks (`Task.targets`): "boxes" (with their classes) or
# "masks" (a class per pixel, background 0). Readers branch on this, never on the task's name.
TARGETS = ("boxes", "masks")


def load_source(cfg: DataConfig, targets: str | None = None) -> SourceData:
    """Load the source named by `cfg.source`, with per-object `targets` for a dense source (its module is
    imported only when used)."""
    if cfg.source in _DENSE_MODULES:
        if targets not in TARGETS:
            raise ValueError(f"data.source {cfg.source!r} reads {' or '.join(TARGETS)} per image; asked for {targets!r}")
        return importlib.import_module(f"visionops.data.sources.{_DENSE_MODULES[cfg.source]}").load(cfg, targets)
    module = importlib.import_module(f"visionops.data.sources.{_MODULES[cfg.source]}")
    load: Callable[[DataConfig], SourceData] = module.load
    return load(cfg)
