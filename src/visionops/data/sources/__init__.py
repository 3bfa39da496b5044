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


_MODULES = {"digits": "digits", "cifar10": "cifar10", "folder": "folder"}


def load_source(cfg: DataConfig) -> SourceData:
    """Load the source named by `cfg.source` (its module is imported only when used)."""
    module = importlib.import_module(f"visionops.data.sources.{_MODULES[cfg.source]}")
    load: Callable[[DataConfig], SourceData] = module.load
    return load(cfg)
