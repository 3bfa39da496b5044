"""Pascal VOC xml (detection), parsed by torchvision's `VOCDetection.parse_voc_xml`.

Layout (a VOC year folder, e.g. VOCdevkit/VOC2012, as data.root):

    root/Annotations/<id>.xml          <filename>, and <object><name> + <bndbox> xmin ymin xmax ymax
    root/JPEGImages/<filename>         the image the xml names (<id>.jpg when it names none)
    root/ImageSets/Main/<split>.txt    optional: the ids of train, val and test (else every xml is train)
    root/<data.annotations>            optional class list, one name a line (default labels.txt); without it
                                       the classes are the sorted object names of the train split

Boxes are taken as written (xyxy in pixels, as torchvision's VOC wrapper does); an object whose name is
not a class keeps class -1 (validation fails on it). torchvision's `VOCDetection` itself insists on the
VOCdevkit folder names and the official image sets, hence only its parser is used. An xml, image or class
list that resolves outside data.root is refused by name (`visionops.data.roots`).
"""

from __future__ import annotations

from pathlib import Path
from xml.etree.ElementTree import ParseError, parse

from visionops.config import DataConfig
from visionops.data.changes import file_digests
from visionops.data.dataset import SPLITS
from visionops.data.dense import DenseImage, DenseObject, decode_error, to_source_data
from visionops.data.images import read_source_image
from visionops.data.roots import data_roots, resolve_inside
from visionops.data.sources import SourceData
from visionops.errors import InvalidInputError, MissingInputError


def _split_ids(root: Path) -> dict[str, list[str]]:
    sets = root / "ImageSets" / "Main"
    named = {s: (sets / f"{s}.txt").read_text().split() for s in SPLITS if (sets / f"{s}.txt").is_file()}
    if named and "train" not in named:
        raise InvalidInputError(f"data.root: {sets} has {', '.join(named)}.txt but no train.txt")
    return named or {"train": sorted(p.stem for p in (root / "Annotations").glob("*.xml"))}


def _parse(root: Path, roots: tuple[Path, ...], image_id: str) -> dict:
    from torchvision.datasets import VOCDetection

    xml = resolve_inside(roots, root / "Annotations" / f"{image_id}.xml", f"data.root: VOC id {image_id!r}")
    try:
        return VOCDetection.parse_voc_xml(parse(xml).getroot()).get("annotation", {})
    except (OSError, ParseError) as exc:
        raise InvalidInputError(f"{xml}: not a readable VOC annotation: {decode_error(exc)}") from exc


def _objects(ann: dict) -> list[dict]:
    objs = ann.get("object", [])
    return objs if isinstance(objs, list) else [objs]


def _box(obj: dict) -> tuple[float, float, float, float]:
    b = obj.get("bndbox") or {}
    try:
        return tuple(float(b[k]) for k in ("xmin", "ymin", "xmax", "ymax"))
    except (KeyError, TypeError, ValueError):
        return (float("nan"),) * 4


def load(cfg: DataConfig, targets: str) -> SourceData:
    root = Path(cfg.root).expanduser()
    if not (root / "Annotations").is_dir():
        raise MissingInputError(f"data.root: {root} has no Annotations/ folder (a VOC year folder is expected)")
    roots = data_roots(cfg)
    anns = {s: [(i, _parse(root, roots, i)) for i in ids] for s, ids in _split_ids(root).items()}
    labels_file = root / cfg.annotation_file
    if labels_file.is_file():
        resolve_inside(roots, labels_file, "data.annotations")
        class_names = [line.strip() for line in labels_file.read_text().splitlines() if line.strip()]
    else:
        class_names = sorted({str(o.get("name")) for _, a in anns["train"] for o in _objects(a)})
    index = {name: i for i, name in enumerate(class_names)}
    records = {}
    for s, items in anns.items():
        records[s] = []
        for image_id, ann in items:
            path = f"JPEGImages/{ann.get('filename') or image_id + '.jpg'}"
            rec = DenseImage(path)
            file = resolve_inside(roots, root / path, f"Annotations/{image_id}.xml: <filename>")
            try:
                rec.take(read_source_image(file, cfg.image_size, cfg.channels, cfg.resize, cfg.near_duplicate_hash))
            except Exception as exc:  # noqa: BLE001 - every decoder failure is reported per file
                rec.error = decode_error(exc)
            names = [str(o.get("name")) for o in _objects(ann)]
            rec.objects = [DenseObject(n, n, index.get(n, -1), _box(o)) for n, o in zip(names, _objects(ann))]
            records[s].append(rec)
    src = to_source_data(records, class_names, targets, cfg)
    sets = [root / "ImageSets" / "Main" / f"{s}.txt" for s in SPLITS]
    read = [root / "Annotations" / f"{i}.xml" for items in anns.values() for i, _ in items]
    src.annotations = file_digests(root, [*read, *(f for f in (labels_file, *sets) if f.is_file())])
    return src
