"""A trained model's file, for every task: tensors and plain values only (read back with
`torch.load(weights_only=True)`), and the same weights always give the same bytes."""

from __future__ import annotations

import io
from pathlib import Path

import torch

from visionops.atomic import write_bytes
from visionops.errors import InvalidInputError, MissingInputError


def save(path: Path, payload: dict) -> None:
    """Write `payload` (metadata and a "state_dict") to `path` atomically."""
    buf = io.BytesIO()  # torch.save names the zip's top folder after the file: a temp file's name would leak in
    torch.save(payload, buf)
    write_bytes(path, buf.getvalue())


def read(path: Path | str, task: str) -> dict:
    """The payload of the `task` model at `path` (classification files predate the "task" key)."""
    path = Path(path)
    if not path.exists():
        raise MissingInputError(f"{path}: no trained model (run `visionops train`)")
    info = load_weights_only(path, "retrain it with `visionops train`")
    if info.get("task", "classification") != task:
        raise InvalidInputError(f"{path}: a {info.get('task', 'classification')} model, not a {task} one")
    return info


def load_weights_only(path: Path | str, remedy: str):
    """`torch.load(weights_only=True)` of `path`; a file that holds code (a pickled class or function) is
    refused with one InvalidInputError naming the file, the global it would have run, and `remedy`."""
    import pickle
    import re

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(exc))
        what = f"the pickled global {found.group(1)}" if found else "objects that are not tensors or plain values"
        raise InvalidInputError(f"{path}: refused: it holds code ({what}), and visionops loads only tensors and plain "
                                f"values (torch.load weights_only); {remedy}") from None
