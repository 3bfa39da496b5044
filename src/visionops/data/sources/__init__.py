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


_MODULES = {"digits": "digits", "cifar10": "cifar10", "folder": "folder"}
# Sources with per-object targets, which depend on the task (boxes or masks): their load takes the task too.
_DENSE_MODULES = {"canvases": "canvases", "coco": "coco", "voc": "voc", "yolo": "yolo", "masks": "masks"}


def load_source(cfg: DataConfig, task: str = "classification") -> SourceData:
    """Load the source named by `cfg.source` for `task` (its module is imported only when used)."""
    if cfg.source in _DENSE_MODULES:
        return importlib.import_module(f"visionops.data.sources.{_DENSE_MODULES[cfg.source]}").load(cfg, task)
    module = importlib.import_module(f"visionops.data.sources.{_MODULES[cfg.source]}")
    load: Callable[[DataConfig], SourceData] = module.load
    return load(cfg)
