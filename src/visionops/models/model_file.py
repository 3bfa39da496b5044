"""A trained model's file, for every task: tensors and plain values only (read back with
`torch.load(weights_only=True)`), and the same weights always give the same bytes."""

from __future__ import annotations

import io
import sys
from pathlib import Path

import torch

from visionops.atomic import write_bytes
from visionops.errors import InvalidInputError, MissingInputError


def save(path: Path, payload: dict) -> None:
    """Write `payload` (metadata and a "state_dict") to `path` atomically, in its `canonical` form."""
    buf = io.BytesIO()  # torch.save names the zip's top folder after the file: a temp file's name would leak in
    torch.save(canonical(payload), buf)
    write_bytes(path, buf.getvalue())


def canonical(value):
    """An equal copy of `value` whose pickle depends on its values alone, not on which objects it shares.

    Pickle writes an object seen before as a reference to it: a history half read back from a checkpoint
    (its rows' key strings loaded, not the loop's own) would otherwise pickle longer than one never
    interrupted. Here every string is interned (each distinct one written once), every container and
    tensor is fresh (none written as a reference), and tensors are contiguous copies of their own.
    """
    if isinstance(value, str):
        return sys.intern(str(value))
    if isinstance(value, dict):
        return {canonical(k): canonical(v) for k, v in value.items()}
    if isinstance(value, list):
        return [canonical(v) for v in value]
    if isinstance(value, tuple):
        return tuple(canonical(v) for v in value)
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().clone(memory_format=torch.contiguous_format)
    return value


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
