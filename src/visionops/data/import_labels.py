"""`visionops import-labels <folder>`: reviewed images, labelled in the layout of data.source, added to data.root.

The folder is read by the source's own reader (`data.sources`) and checked as `validate` would check it: a file
that cannot be decoded, a class not in the source's class set, a box outside its image or without area, a mask
of the wrong size or with a value outside the class set, a blank or saturated image. Any problem is one error
naming every offending file, and nothing is copied. Then each file is copied into data.root, atomically, where the
source reads it (the train part: the stable splits place each new image, `data.splits`), images after their
labels (VOC: its xml after its image), so an interrupted import leaves nothing half-labelled and a rerun finishes
it. An existing file is never overwritten: the same bytes are skipped and counted, other bytes are an error
naming both. Every file to copy is listed first in the record `layout.IMPORTS` (`data.imports`), which `download`
depends on (dvc.yaml), so the next `dvc repro` reruns download, and which keeps a near-duplicate group's name.

Layouts (the import folder's, as the source reads it; class lists may be left out, the source's own is used):
folder `<class>/<image>` (or `train/<class>/<image>`); voc `Annotations/<id>.xml` + `JPEGImages/<file>` (data.root
without ImageSets/Main); yolo data.yaml with the source's `names` and a `train` image folder with its labels
folder; masks `images/<stem>.<ext>` + `masks/<stem>.png` (or under `train/`). coco keeps every image in one json,
and a VOC root with ImageSets/Main lists its images in train.txt: an import would rewrite those files, which
`download` reports as changed, so both are refused, as are the generated sources (digits, cifar10, canvases).
"""

from __future__ import annotations

import shutil
import sys
from collections import Counter
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from visionops import layout
from visionops.atomic import atomic_path
from visionops.serving.integrity import file_sha256
from visionops.config import DataConfig, Params
from visionops.data import imports
from visionops.data.roots import data_roots, resolve_inside
from visionops.data.sources import SourceData, load_source
from visionops.errors import InvalidInputError, MissingInputError

NAMED = 20  # problems named in the error, then a count
PROGRESS = 100  # files from which the copy shows a progress bar
INSTEAD = {"classification": "data.source: folder", "detection": "data.source: voc or yolo",
           "segmentation": "data.source: masks"}
REFUSED = {
    "digits": "is generated (embedded in scikit-learn)",
    "cifar10": "is read from the official archive",
    "canvases": "is generated",
    "coco": "keeps every image in one json, which an import would rewrite (download reports a rewritten "
            "annotation file as changed); add the images to it by hand and download with data.on_changed_file: warn",
}


@dataclass
class Copy:
    source: Path  # the reviewed file
    dest: str  # where it goes, relative to data.root
    image: bool  # an image (counted), not a label file


def _refuse(params: Params) -> None:
    cfg = params.data
    if cfg.source in REFUSED:
        folder = "" if cfg.source == "coco" else (
            f", not a folder of files: import-labels adds to a folder; set {INSTEAD[params.task]} and data.root "
            "to the folder (the layouts are in the README)")
        raise InvalidInputError(f"data.source {cfg.source!r} {REFUSED[cfg.source]}{folder}")
    root = Path(cfg.root).expanduser()
    if not root.is_dir():
        raise MissingInputError(f"data.root: {root} is not a directory")
    if cfg.source == "voc" and (root / "ImageSets" / "Main").is_dir():
        raise InvalidInputError(
            f"data.root {root} lists its images in ImageSets/Main/*.txt, which an import would rewrite "
            "(download reports a rewritten annotation file as changed); add the ids to train.txt by hand and download "
            "with data.on_changed_file: warn")


def _class_list(cfg: DataConfig, folder: Path) -> dict:
    """The import's DataConfig changes: read `folder`; a class list it lacks is data.root's (which it may read)."""
    own = cfg.annotation_file and (folder / cfg.annotation_file).is_file()
    if cfg.source not in ("voc", "masks") or own:
        return {}
    target = Path(cfg.root).expanduser() / cfg.annotation_file
    return {"annotations": str(target.resolve()), "allowed_roots": [cfg.root]} if target.is_file() else {}


def _target_classes(cfg: DataConfig) -> list[str]:
    """data.root's class names, read as `download` reads them (without decoding its images)."""
    root = Path(cfg.root).expanduser()
    if cfg.source == "folder":
        from visionops.data.sources.folder import _class_names, _split_roots

        return _class_names(_split_roots(root)["train"])
    if cfg.source == "masks":
        from visionops.data.sources.masks import read_class_list

        return read_class_list(resolve_inside(data_roots(cfg), root / cfg.annotation_file, "data.annotations"))[0]
    if cfg.source == "yolo":
        from visionops.data.sources.yolo import _config, _names

        path = root / cfg.annotation_file
        names = _names(path, _config(resolve_inside(data_roots(cfg), path, "data.annotations"))["names"])
        return [names[i] for i in range(len(names))]
    from visionops.data.sources.voc import _objects, _parse, _split_ids

    labels = root / cfg.annotation_file
    if labels.is_file():
        return [line.strip() for line in labels.read_text().splitlines() if line.strip()]
    roots = data_roots(cfg)
    return sorted({str(o.get("name")) for i in _split_ids(root)["train"] for o in _objects(_parse(root, roots, i))})


def _box(o) -> str:
    return "[" + ", ".join(f"{v:g}" for v in o.box) + "]"


def _problems(src: SourceData, classes: list[str], targets: str | None, params: Params) -> list[str]:
    """What `validate` would fail on in the import (read as `src`), one `<path>: <problem>` each."""
    import math

    from visionops.data.dense import box_is_sane
    from visionops.data.expectations import image_stats

    out = [f"{r.path}: {r.error}" for r in src.rejected]
    split = src.splits["train"]
    names = [src.class_names[c] for c in split.labels] if targets is None else []
    out += [f"{p}: class {n!r} is not in data.root's classes {classes}" for p, n in zip(split.paths, names)
            if n not in classes]
    for path, (h, w, _) in zip(split.paths, split.orig_shapes) if targets else ():
        facts = src.facts[path]
        if targets == "masks":
            if facts.mask_shape != (h, w):
                out.append(f"{path}: mask {facts.mask_shape[1]}x{facts.mask_shape[0]} does not match the {w}x{h} image")
            if facts.unknown_values:
                out.append(f"{path}: mask values {facts.unknown_values} are not in the class set {classes} (or 255)")
            continue
        for k, o in enumerate(facts.objects):
            if o.class_index < 0 or o.category_name not in classes:
                out.append(f"{path} object {k}: class {o.category} ({o.category_name or 'no name'}) is not in "
                           f"data.root's classes {classes}")
            elif not all(map(math.isfinite, o.box)):
                out.append(f"{path} object {k}: has no box")
            elif not box_is_sane(o.box, h, w):
                out.append(f"{path} object {k}: box {_box(o)} outside the {w}x{h} image or without area")
    means, stds, _ = image_stats(split.images)
    lo, hi = params.validate_.pixel_mean_range
    out += [f"{p}: pixel mean {m:.1f}, std {s:.1f} (blank or saturated)" for p, m, s in zip(split.paths, means, stds)
            if not (lo <= m <= hi and s >= params.validate_.min_pixel_std)]
    return out


def _copies(cfg: DataConfig, folder: Path, src: SourceData) -> list[Copy]:
    """Each file to copy, in order: a file the reader starts from (an image; VOC: its xml) after its label."""
    root = Path(cfg.root).expanduser()
    images = src.splits["train"].paths
    if cfg.source == "yolo":
        from visionops.data.sources.yolo import _config, _label_file

        def train(base: Path) -> Path:
            config = _config(base / cfg.annotation_file)
            return base / str(config.get("path") or "") / str(config["train"])

        mine, theirs = train(folder), train(root)
        out = []
        for p in images:
            dest = theirs / (folder / p).relative_to(mine)
            label = _label_file(folder / p)
            if label.is_file():
                out.append(Copy(label, _label_file(dest).relative_to(root).as_posix(), False))
            out.append(Copy(folder / p, dest.relative_to(root).as_posix(), True))
        return out
    # the label files read (VOC's xml, masks' PNGs), not the class list nor VOC's image sets
    read = ("Annotations/",) if cfg.source == "voc" else ("masks/", "train/masks/")
    labels = [p for p in src.annotations if p.startswith(read)]
    if cfg.source == "voc":  # the xml names its image: the image first
        return [Copy(folder / p, p, True) for p in images] + [Copy(folder / p, p, False) for p in labels]
    split = "train/" if (root / "train" / ("images" if cfg.source == "masks" else "")).is_dir() else ""

    def dest(p: str) -> str:
        return split + p.removeprefix("train/")

    return [Copy(folder / p, dest(p), False) for p in labels] + [Copy(folder / p, dest(p), True) for p in images]


def _same(a: Path, b: Path) -> bool:
    return a.stat().st_size == b.stat().st_size and file_sha256(a) == file_sha256(b)


def _fail(what: str, problems: list[str]) -> None:
    more = f"\n  ... and {len(problems) - NAMED} more" if len(problems) > NAMED else ""
    raise InvalidInputError(f"{what}; nothing copied:\n  " + "\n  ".join(problems[:NAMED]) + more)


def import_labels(params: Params, folder: Path, dry_run: bool = False, record: Path = layout.IMPORTS) -> dict:
    """Check the reviewed images in `folder` and copy them into data.root (module docstring); with `dry_run`, check
    and count only. `record`: the list of imported files that `download` depends on."""
    from tqdm import tqdm

    from visionops.tasks import get_task

    _refuse(params)
    cfg, folder = params.data, Path(folder).expanduser()
    if not folder.is_dir():
        raise MissingInputError(f"{folder} is not a directory")
    targets = get_task(params.task).targets
    mine = cfg.model_copy(update={"root": str(folder), "allowed_roots": [], **_class_list(cfg, folder)})
    src = load_source(mine, targets)
    extra = sorted(set(src.splits) - {"train"})
    if extra:
        raise InvalidInputError(f"{folder} has {', '.join(extra)} images; the stable splits place "
                                "reviewed images: give them as train (the source's layout without split folders)")
    classes = _target_classes(cfg)
    if cfg.source in ("yolo", "masks") and classes != src.class_names:  # their labels are class indices
        _fail(f"{folder / cfg.annotation_file} is not data.root's class list", [f"{src.class_names} != {classes}"])
    problems = _problems(src, classes, targets, params)
    if problems:
        _fail(f"{len(problems)} problem(s) in {folder}", problems)

    root, roots = Path(cfg.root).expanduser(), data_roots(cfg)
    copies = _copies(cfg, folder, src)
    clashes, skipped = [], set()
    for c in copies:
        dest = resolve_inside(roots, root / c.dest, f"copying {c.source}")
        if dest.exists():
            if not _same(c.source, dest):
                clashes.append(f"{c.source} and {dest} differ (same name, other bytes)")
            skipped.add(c.dest)
    if clashes:
        _fail(f"{len(clashes)} file(s) would overwrite data.root's; rename them", clashes)

    label_of = dict(zip(src.splits["train"].paths, src.splits["train"].labels))
    new = [c for c in copies if c.dest not in skipped]
    per_class = Counter(src.class_names[label_of[c.source.relative_to(folder).as_posix()]]
                        for c in new if c.image)
    result = {
        "source": cfg.source, "data_root": str(root), "folder": str(folder), "dry_run": dry_run,
        "imported": sum(c.image for c in new), "skipped": sum(c.image for c in copies if c.dest in skipped),
        "label_files": sum(not c.image for c in new), "per_class": dict(sorted(per_class.items())),
        "record": str(record),
    }  # fmt: skip
    if dry_run:
        return result
    rows = imports.read(record)  # first: a copy it lists and an interrupted import left out, a rerun makes
    listed = {(r["path"], r["sha256"]) for r in rows}
    now = datetime.now(UTC).isoformat(timespec="seconds")
    added = [{"imported": now, "source": cfg.source, "path": c.dest, "sha256": digest} for c in new
             if (c.dest, digest := file_sha256(c.source)) not in listed]
    if added:
        imports.write(record, rows + added)
    bar = dict(total=len(new), desc="import", unit="file", file=sys.stderr, disable=len(new) < PROGRESS or None)
    for c in tqdm(new, **bar):
        with atomic_path(root / c.dest) as tmp:
            shutil.copyfile(c.source, tmp)
    return {**result, "next": f"commit {record} and run `dvc repro`: download places the new images"} if new else result
