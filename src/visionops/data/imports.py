"""The record of `import-labels` (`layout.IMPORTS`, data/imports.csv, kept by git): a row per file it added to
data.root (imported: UTC time, source, path relative to data.root, sha256).

`download` depends on it in dvc.yaml (DVC does not watch data.root), and names a near-duplicate group by its
earliest member (`neardup.group_identities`): an image not in the record came first, so an imported copy of a
placed image joins its group without renaming it, and no placed image moves.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

from visionops.atomic import write_text

FIELDS = ["imported", "source", "path", "sha256"]


def read(path: Path) -> list[dict]:
    """The record's rows ([] when there is none)."""
    if not path.is_file():
        return []
    with path.open(newline="") as fh:
        return list(csv.DictReader(fh))


def write(path: Path, rows: list[dict]) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, FIELDS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    write_text(path, buf.getvalue())


def imported_at(path: Path | None) -> dict[tuple[str, str], str]:
    """{(path, sha256): the time it was imported} of the record at `path` (None: no record)."""
    return {(r["path"], r["sha256"]): r["imported"] for r in read(path)} if path is not None else {}
