"""Readers stay inside data.root: every path a reader opens is resolved (symlinks followed) and refused, by
name, unless it lies under data.root or one of data.allowed_roots.

A path comes from a setting (data.annotations), from an annotation (a COCO `file_name`, a VOC `<filename>`,
a YOLO image folder) or from walking a folder (where a symlinked file or folder may lead anywhere); each is
checked where it is read, and the refusal names the file and entry that referenced it.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from visionops.config import DataConfig
from visionops.errors import InvalidInputError


def data_roots(cfg: DataConfig) -> tuple[Path, ...]:
    """data.root, then data.allowed_roots, resolved: the folders a reader may read from."""
    return tuple(Path(p).expanduser().resolve() for p in (cfg.root, *cfg.allowed_roots))


def resolve_inside(roots: tuple[Path, ...], path: Path | str, what: str) -> Path:
    """`path` resolved, symlinks followed; InvalidInputError naming `what` (the file and entry that referenced
    it), the path and data.root when it lies under none of `roots` (`data_roots`)."""
    try:
        resolved = Path(path).expanduser().resolve()
    except (OSError, RuntimeError) as exc:  # a symlink loop
        raise InvalidInputError(f"{what}: {path} cannot be resolved: {exc}") from exc
    if any(resolved.is_relative_to(root) for root in roots):
        return resolved
    allowed = f" nor data.allowed_roots {[str(r) for r in roots[1:]]}" if len(roots) > 1 else ""
    raise InvalidInputError(
        f"{what}: {path} resolves to {resolved}, outside data.root {roots[0]}{allowed}; readers only read inside "
        "data.root (list a folder in data.allowed_roots to allow it)"
    )


def files_inside(roots: tuple[Path, ...], folder: Path, what: str) -> Iterator[tuple[Path, Path]]:
    """(path under `folder`, resolved path) of every file below `folder`, sorted. `folder` and every entry below
    it, a symlinked folder included (it is not walked into), are checked with `resolve_inside`, `what` naming
    the file or setting that gave `folder`; `folder` first, so that nothing outside is walked."""
    base = resolve_inside(roots, folder, what)
    for entry in sorted(folder.rglob("*")):
        # rglob walks no symlinked folder, so only a symlink leads elsewhere than `base` (and resolving is slow)
        resolved = resolve_inside(roots, entry, what) if entry.is_symlink() else base / entry.relative_to(folder)
        if resolved.is_file():
            yield entry, resolved
