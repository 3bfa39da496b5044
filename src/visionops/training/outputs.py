"""What every training run shares besides the loop: its resume fingerprint, timing and history files."""

from __future__ import annotations

import csv
import hashlib
import io
import json
from pathlib import Path

import numpy as np

from visionops import atomic


def fingerprint(*parts: object, arrays: tuple[np.ndarray, ...] = ()) -> str:
    """A digest of settings and data: a checkpoint is resumed only when it matches."""
    h = hashlib.blake2b(json.dumps(parts, sort_keys=True, default=str).encode(), digest_size=16)
    for arr in arrays:
        h.update(np.ascontiguousarray(arr).data)
    return h.hexdigest()


def run_seconds(history: list[dict], train_images: int) -> dict:
    """Training time of the whole run (the epochs before a resume included) and its throughput."""
    seconds = sum(row["epoch_seconds"] for row in history)
    return {"train_seconds": seconds, "train_images_per_second": train_images * len(history) / max(seconds, 1e-9)}


def write_history(history: list[dict], reports_dir: Path, stem: str = "history") -> None:
    """The per-epoch rows as `stem`.csv (dvc.yaml's plots draw it)."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(history[0]))
    writer.writeheader()
    writer.writerows(history)
    atomic.write_text(reports_dir / f"{stem}.csv", buf.getvalue())
