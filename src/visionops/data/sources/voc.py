"""Pascal VOC xml (detection), parsed by torchvision's `VOCDetection.parse_voc_xml`.

Layout (a VOC year folder, e.g. VOCdevkit/VOC2012, as data.root):

    root/Annotations/<id>.xml          <filename>, and <object><name> + <bndbox> xmin ymin xmax ymax
    root/JPEGImages/<filename>         the image the xml names (<id>.jpg when it names none)
    root/ImageSets/Main/<split>.txt    optional: the ids of train, val and test (else every xml is train)
    root/<data.annotations>            optional class list, one name a line (default labels.txt); without it
                                       the classes are the sorted object names of the train split

Boxes are taken as written (xyxy in pixels, as torchvision's VOC wrapper does); an object whose name is
not a class keeps class -1 (validation fails on it). torchvision's `VOCDetection` itself insists on the
VOCdevkit folder names and the official image sets, hence only its parser is used.
"""

from __future__ import annotations

from pathlib import Path
from xml.etree.ElementTree import ParseError, parse

from visionops.config import DataConfig
from visionops.data.dataset import SPLITS
from visionops.data.dense import DenseImage, DenseObject, decode_error, to_source_data
from visionops.data.images import decode_file, file_hash
from visionops.data.sources import SourceData
from visionops.errors import InvalidInputError, MissingInputError


def _split_ids(root: Path) -> dict[str, list[str]]:
    sets = root / "ImageSets" / "Main"
    named = {s: (sets / f"{s}.txt").read_text().split() for s in SPLITS if (sets / f"{s}.txt").is_file()}
    if named and "train" not in named:
        raise InvalidInputError(f"data.root: {sets} has {', '.join(named)}.txt but no train.txt")
    return named or {"train": sorted(p.stem for p in (root / "Annotations").glob("*.xml"))}


def _parse(root: Path, image_id: str) -> dict:
    from torchvision.datasets import VOCDetection

    xml = root / "Annotations" / f"{image_id}.xml"
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
    anns = {s: [(i, _parse(root, i)) for i in ids] for s, ids in _split_ids(root).items()}
    labels_file = root / cfg.annotation_file
    if labels_file.is_file():
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
            try:
                rec.image, rec.orig = decode_file(root / path, cfg.image_size, cfg.channels)
                rec.identity = file_hash(root / path)
            except Exception as exc:  # noqa: BLE001 - every decoder failure is reported per file
                rec.error = decode_error(exc)
            names = [str(o.get("name")) for o in _objects(ann)]
            rec.objects = [DenseObject(n, n, index.get(n, -1), _box(o)) for n, o in zip(names, _objects(ann))]
            records[s].append(rec)
    return to_source_data(records, class_names, targets, cfg)
