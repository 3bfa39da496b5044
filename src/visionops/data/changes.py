"""Tamper-evident data: a source file whose bytes changed under the same name is found by the next download.

Each split's manifest.csv holds its files' SHA-256 (`Split.sha256`), but DVC deletes a stage's outputs before
it runs the stage again (only `persist: true` outputs survive), so `download` also keeps them beside the
dataset, in `<dataset>.sha256.json` (data/dataset.sha256.json), which no stage declares and DVC leaves alone:
the source, data.root (resolved) and {path relative to data.root: SHA-256} of every image stored, holdout
included, and of the annotation files a dense source read (`SourceData.annotations`). The next download of
the same source and root compares: a path whose SHA-256 differs is reported by name, an error unless
data.on_changed_file is "warn"; files added or removed are normal growth and only listed. The record is
replaced once the dataset is written, never after an error, so a changed file keeps failing until the change
is accepted (one download with data.on_changed_file: warn).
"""

from __future__ import annotations

import hashlib
import json
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from visionops.atomic import write_json
from visionops.config import DataConfig
from visionops.data.sources import SourceData
from visionops.errors import InvalidInputError

NAMED = 20  # changed files named in the error, then a count
LISTED = 5  # added or removed files named, then a count


@dataclass
class Changes:
    changed: list[str]
    added: list[str]
    removed: list[str]


def record_path(out_dir: Path) -> Path:
    return out_dir.with_name(f"{out_dir.name}.sha256.json")


def source_digests(src: SourceData) -> dict[str, str]:
    """{path: SHA-256} of the stored images and annotation files of a source of files; empty for other sources."""
    images = {path: digest for split in src.splits.values() for path, digest in zip(split.paths, split.sha256)}
    return images | src.annotations


def file_digests(root: Path, paths: Iterable[Path]) -> dict[str, str]:
    """{path relative to `root` (data.root; else as given): SHA-256} of the files `paths`."""
    out = {}
    for path in paths:
        with open(path, "rb") as fh:
            digest = hashlib.file_digest(fh, "sha256").hexdigest()
        out[(path.relative_to(root) if path.is_relative_to(root) else path).as_posix()] = digest
    return out


def _record(cfg: DataConfig, digests: dict[str, str]) -> dict:
    return {"source": cfg.source, "root": str(Path(cfg.root).expanduser().resolve()), "sha256": digests}


def _names(paths: list[str], shown: int) -> str:
    more = f" and {len(paths) - shown} more" if len(paths) > shown else ""
    return ", ".join(paths[:shown]) + more


def compare(previous: dict[str, str], current: dict[str, str]) -> Changes:
    return Changes(
        changed=sorted(p for p in previous.keys() & current.keys() if previous[p] != current[p]),
        added=sorted(current.keys() - previous.keys()),
        removed=sorted(previous.keys() - current.keys()),
    )


def check(cfg: DataConfig, digests: dict[str, str], out_dir: Path) -> Changes | None:
    """Compare `digests` with the last download's record beside `out_dir` (None when there is none for this
    source and root); list files added and removed, and raise InvalidInputError naming the changed files
    (or, with data.on_changed_file "warn", print them)."""
    path = record_path(out_dir)
    if not digests or not path.is_file():
        return None
    last = json.loads(path.read_text())
    mine = _record(cfg, {})
    if (last.get("source"), last.get("root")) != (mine["source"], mine["root"]):
        return None
    found = compare(last["sha256"], digests)
    if found.added or found.removed:
        print(f"download: since the last download, {len(found.added)} file(s) added"
              f"{' (' + _names(found.added, LISTED) + ')' if found.added else ''} and {len(found.removed)} "
              f"removed{' (' + _names(found.removed, LISTED) + ')' if found.removed else ''}", file=sys.stderr)
    if found.changed:
        what = (f"data.root {mine['root']}: {len(found.changed)} file(s) changed since the last download under "
                f"the same name (another SHA-256 than {path} records): {_names(found.changed, NAMED)}")
        if cfg.on_changed_file == "error":
            raise InvalidInputError(f"{what}; if the change is intended, download once with "
                                    "data.on_changed_file: warn")
        print(f"download: warning: {what}", file=sys.stderr)
    return found


def save(cfg: DataConfig, digests: dict[str, str], out_dir: Path) -> None:
    """Record `digests` beside `out_dir` for the next download to compare with."""
    if digests:
        write_json(record_path(out_dir), _record(cfg, digests))
