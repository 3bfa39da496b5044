"""`visionops import-labels`: reviewed images are checked by the source's reader, copied into data.root without
overwriting, listed in the record download depends on, and placed by the stable splits without moving any image."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

import dense_folders as F
from pipeline_project import Project
from visionops.cli import main
from visionops.config import parse_params
from visionops.data import dataset
from visionops.data.download import run_download
from visionops.data.import_labels import import_labels
from visionops.data.neardup import group_identities
from visionops.errors import InvalidInputError, MissingInputError

ROOT = Path(__file__).resolve().parents[1]
PRESETS = ROOT / "presets"
FRACTIONS = {"val_fraction": 0.2, "test_fraction": 0.2, "holdout_fraction": 0.2}
TASK = {"folder": "classification", "voc": "detection", "yolo": "detection", "masks": "segmentation"}
# each canvas's files in a source's layout (the first is its image)
FILES = {
    "voc": ("JPEGImages/{}.png", "Annotations/{}.xml"),
    "yolo": ("images/train/{}.png", "labels/train/{}.txt"),
    "masks": ("images/{}.png", "masks/{}.png"),
}
F_TARGETS = {"voc": "boxes", "yolo": "boxes", "masks": "masks"}
WRITERS = {"voc": F.voc_folder, "yolo": F.yolo_folder, "masks": F.masks_folder}
REVIEWED = F.NAMES[16:]  # the canvases that come back from review; data.root holds the first 16


def _photo(rng: np.random.Generator) -> Image.Image:
    """A 48x48 RGB picture of smooth random structure (a 6x6 grid upsampled), distinct from any other."""
    return Image.fromarray(rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)).resize((48, 48), Image.Resampling.BICUBIC)


def _photos(root: Path, names: range, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    for cls in ("a", "b"):
        (root / cls).mkdir(parents=True, exist_ok=True)
        for i in names:
            _photo(rng).save(root / cls / f"{i:03d}.png")
    return root


def _params(source: str, root: Path, **data) -> object:
    """The task's preset (its models fit the task) reading `source` at `root`."""
    preset = {"folder": ROOT / "params.yaml", "voc": PRESETS / "detection.yaml", "yolo": PRESETS / "detection.yaml",
              "masks": PRESETS / "segmentation.yaml"}[source]
    raw = yaml.safe_load(preset.read_text())
    extra = {"channels": 3, "image_size": 16} if source == "folder" else {"image_size": F.SIZE, "channels": 1}
    raw["data"] = {**raw["data"], "source": source, "root": str(root), **extra, **data}
    return parse_params(raw)


def _dense(source: str, tmp_path: Path) -> tuple[Path, Path]:
    """(data.root with the first 16 canvases, a reviewed folder with the other 8) in `source`'s layout."""
    root, reviewed = WRITERS[source](tmp_path / "root"), tmp_path / "reviewed"
    for name in REVIEWED:
        for pattern in FILES[source]:
            (reviewed / pattern.format(name)).parent.mkdir(parents=True, exist_ok=True)
            shutil.move(root / pattern.format(name), reviewed / pattern.format(name))
    if source == "yolo":
        shutil.copy(root / "data.yaml", reviewed / "data.yaml")
    return root, reviewed


def _record(path: Path) -> list[dict]:
    with path.open(newline="") as fh:
        return list(csv.DictReader(fh))


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_a_folder_import_copies_counts_and_records_then_skips_the_same_bytes(tmp_path):
    root = _photos(tmp_path / "root" / "train", range(6), seed=0).parent
    reviewed = _photos(tmp_path / "reviewed", range(6, 9), seed=1)
    (reviewed / "b" / "008.png").unlink()
    record = tmp_path / "imports.csv"
    params = _params("folder", root)

    dry = import_labels(params, reviewed, dry_run=True, record=record)
    assert (dry["imported"], dry["skipped"], dry["per_class"]) == (5, 0, {"a": 3, "b": 2})
    assert not record.exists() and not (root / "train" / "a" / "006.png").exists()

    done = import_labels(params, reviewed, record=record)
    assert (done["imported"], done["skipped"], done["label_files"]) == (5, 0, 0)
    for path in ("a/006.png", "a/008.png", "b/007.png"):  # the flat layout goes where the source reads: train/
        assert (root / "train" / path).read_bytes() == (reviewed / path).read_bytes()
    rows = _record(record)
    assert sorted(r["path"] for r in rows) == ["train/a/006.png", "train/a/007.png", "train/a/008.png",
                                               "train/b/006.png", "train/b/007.png"]
    assert {r["source"] for r in rows} == {"folder"} and all(len(r["sha256"]) == 64 for r in rows)

    again = import_labels(params, reviewed, record=record)
    assert (again["imported"], again["skipped"]) == (0, 5)
    assert _record(record) == rows  # nothing new: download stays up to date


def test_a_clash_an_unknown_class_or_a_broken_file_fails_by_name_and_copies_nothing(tmp_path):
    root = _photos(tmp_path / "root", range(4), seed=0)
    reviewed = _photos(tmp_path / "reviewed", range(3, 6), seed=1)  # 003.png exists with other bytes
    before, record = _files(root), tmp_path / "imports.csv"
    with pytest.raises(InvalidInputError, match=r"would overwrite") as err:
        import_labels(_params("folder", root), reviewed, record=record)
    assert f"{reviewed / 'a' / '003.png'} and {(root / 'a' / '003.png').resolve()} differ" in str(err.value)

    (reviewed / "a" / "003.png").unlink()
    (reviewed / "b" / "003.png").unlink()
    shutil.copytree(reviewed / "a", reviewed / "zebra")
    (reviewed / "b" / "004.png").write_bytes(b"not a png")
    Image.new("RGB", (20, 20), (0, 0, 0)).save(reviewed / "b" / "blank.png")
    with pytest.raises(InvalidInputError, match=r"4 problem\(s\)") as err:
        import_labels(_params("folder", root), reviewed, record=record)
    message = str(err.value)
    assert "b/004.png: UnidentifiedImageError" in message
    assert "zebra/004.png: class 'zebra' is not in data.root's classes ['a', 'b']" in message
    assert "b/blank.png: pixel mean 0.0, std 0.0 (blank or saturated)" in message
    assert _files(root) == before and not record.exists()


@pytest.mark.parametrize("source", ["digits", "cifar10"])
def test_generated_sources_are_refused_saying_what_to_set(source):
    with pytest.raises(InvalidInputError, match=r"not a folder of files: .*set data.source: folder and data.root"):
        import_labels(parse_params({"data": {"source": source}}), Path("."))


def test_canvases_and_coco_are_refused(tmp_path):
    canvases = parse_params(yaml.safe_load((PRESETS / "detection.yaml").read_text()))
    with pytest.raises(InvalidInputError, match=r"'canvases' is generated.*set data.source: voc or yolo"):
        import_labels(canvases, tmp_path)
    raw = yaml.safe_load((PRESETS / "segmentation.yaml").read_text())
    raw["data"] |= {"source": "coco", "root": str(F.coco_folder(tmp_path))}
    coco = parse_params(raw)
    with pytest.raises(InvalidInputError, match=r"'coco' keeps every image in one json"):
        import_labels(coco, tmp_path)


@pytest.mark.parametrize("source", ["voc", "yolo", "masks"])
def test_a_dense_import_copies_images_and_labels_where_the_source_reads_them(tmp_path, source):
    root, reviewed = _dense(source, tmp_path)
    params = _params(source, root)
    done = import_labels(params, reviewed, record=tmp_path / "imports.csv")
    assert (done["imported"], done["label_files"], done["skipped"]) == (8, 8, 0)
    for name in REVIEWED:
        for pattern in FILES[source]:
            assert (root / pattern.format(name)).read_bytes() == (reviewed / pattern.format(name)).read_bytes()
    assert len(_record(tmp_path / "imports.csv")) == 16
    ds = run_download(params.data, tmp_path / "ds", None, TASK[source], F_TARGETS[source], tmp_path / "imports.csv")
    assert sum(ds["splits"].values()) == 24



def test_a_box_outside_or_an_unknown_class_fails_naming_the_file_and_object(tmp_path):
    root, reviewed = _dense("voc", tmp_path)
    xml = reviewed / "Annotations" / f"{REVIEWED[0]}.xml"
    xml.write_text(xml.read_text().replace("<xmax>", "<xmax>5", 1))  # e.g. 40 -> 540
    other = reviewed / "Annotations" / f"{REVIEWED[1]}.xml"
    other.write_text(other.read_text().replace("<name>", "<name>9", 1))  # e.g. 3 -> 93
    with pytest.raises(InvalidInputError, match=r"2 problem\(s\)") as err:
        import_labels(_params("voc", root), reviewed)
    message = str(err.value)
    assert f"JPEGImages/{REVIEWED[0]}.png object 0: box [" in message and "outside the 48x48 image" in message
    assert f"JPEGImages/{REVIEWED[1]}.png object 0: class 9" in message and "is not in data.root's classes" in message
    assert not (root / "JPEGImages" / f"{REVIEWED[2]}.png").exists()


def test_a_mask_value_outside_the_class_set_fails_naming_the_file(tmp_path):
    root, reviewed = _dense("masks", tmp_path)
    mask = reviewed / "masks" / f"{REVIEWED[3]}.png"
    pixels = np.asarray(Image.open(mask)).copy()
    pixels[0, 0] = 40
    Image.fromarray(pixels).save(mask)
    with pytest.raises(InvalidInputError, match=rf"images/{REVIEWED[3]}.png: mask values \[40\] are not in"):
        import_labels(_params("masks", root), reviewed)
    assert not (root / "images" / f"{REVIEWED[0]}.png").exists()


def test_a_yolo_import_with_other_names_is_refused(tmp_path):
    root, reviewed = _dense("yolo", tmp_path)
    (reviewed / "data.yaml").write_text("train: images/train\nnames: ['zero', 'one']\n")
    with pytest.raises(InvalidInputError, match=r"data.yaml is not data.root's class list"):
        import_labels(_params("yolo", root), reviewed)


def test_a_missing_folder_is_named(tmp_path):
    with pytest.raises(MissingInputError, match="nope is not a directory"):
        import_labels(_params("folder", _photos(tmp_path / "root", range(2), 0)), tmp_path / "nope")


def test_an_imported_copy_with_a_smaller_identity_joins_its_group_without_renaming_it():
    hashes = ["0000000000000000", "ffffffffffffffff", "ffffffffffffff00"]
    assert group_identities(["b", "c", "a"], hashes, 8) == ["b", "a", "a"]  # unranked, c's group takes a's name
    assert group_identities(["b", "c", "a"], hashes, 8, ["", "", "2026-12-06T07:00:00+00:00"]) == ["b", "c", "c"]
    later = ["", "2026-12-06T07:00:00+00:00", "2026-12-06T08:00:00+00:00"]  # two imports: the earlier names it
    assert group_identities(["b", "c", "a"], hashes, 8, later) == ["b", "c", "c"]


def _jpeg_copy(image: Path, dest: Path) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    Image.open(image).save(dest, quality=95)


def _parts(out: Path) -> dict[str, str]:
    splits = {**dataset.load(out / "dataset").splits, **dataset.load(out / "holdout").splits}
    return {path: name for name, split in splits.items() for path in split.paths}


@pytest.mark.parametrize("source", ["folder", "voc", "masks"])
def test_the_next_download_keeps_every_placed_image_and_puts_a_near_duplicate_with_its_original(tmp_path, source):
    if source == "folder":
        root = _photos(tmp_path / "root", range(20), seed=0)
        reviewed = _photos(tmp_path / "reviewed", range(20, 26), seed=1)
    else:
        root, reviewed = _dense(source, tmp_path)
    params = _params(source, root, **FRACTIONS)
    targets = {"folder": None, **F_TARGETS}[source]
    record = tmp_path / "imports.csv"
    run_download(params.data, tmp_path / "before" / "dataset", tmp_path / "before" / "holdout", TASK[source], targets,
                 record)
    before = _parts(tmp_path / "before")
    original = next(p for p, part in sorted(before.items()) if part != "train")  # agreeing by chance is less likely
    near = {"folder": "a/near.jpg", "voc": "JPEGImages/near.jpg", "masks": "images/near.jpg"}[source]
    _jpeg_copy(root / original, reviewed / near)
    if source == "voc":
        xml = (root / "Annotations" / f"{Path(original).stem}.xml").read_text()
        (reviewed / "Annotations" / "near.xml").write_text(xml.replace(f"{Path(original).stem}.png", "near.jpg"))
    if source == "masks":
        shutil.copy(root / "masks" / f"{Path(original).stem}.png", reviewed / "masks" / "near.png")
    if source == "folder":  # the original's class
        shutil.move(reviewed / near, reviewed / Path(original).parent.name / "near.jpg")
        near = f"{Path(original).parent.name}/near.jpg"

    done = import_labels(params, reviewed, record=record)
    run_download(params.data, tmp_path / "after" / "dataset", tmp_path / "after" / "holdout", TASK[source], targets,
                 record)
    after = _parts(tmp_path / "after")
    assert {p: after[p] for p in before} == before  # no image already placed moved
    assert len(after) == len(before) + done["imported"]
    assert after[near] == before[original] != "train"


def test_after_an_import_dvc_status_lists_download_and_repro_places_the_new_images(tmp_path):
    """The real loop: download, import through the CLI, `dvc status`, `dvc repro`; git keeps the record."""
    root = _photos(tmp_path / "photos", range(20), seed=0)
    reviewed = _photos(tmp_path / "reviewed", range(20, 24), seed=1)
    project = Project(tmp_path / "project")
    project.set_params(data={"source": "folder", "root": str(root), "channels": 3, "image_size": 16, **FRACTIONS})
    project.repro("download")
    before = _parts(project.path / "data")
    original = next(p for p, part in sorted(before.items()) if part != "train")
    _jpeg_copy(root / original, reviewed / original.replace(".png", "-near.jpg"))
    assert json.loads(project.run("dvc", "status", "--json", "download").stdout) == {}

    out = project.run("visionops", "import-labels", str(reviewed)).stdout
    assert "imported                 9" in out and "commit data/imports.csv and run `dvc repro`" in out
    status = json.loads(project.run("dvc", "status", "--json", "download").stdout)
    assert status == {"download": [{"changed deps": {"data/imports.csv": "modified"}}]}
    assert " M data/imports.csv" in project.run("git", "status", "--porcelain").stdout  # git keeps the record

    project.repro("download")
    after = _parts(project.path / "data")
    assert {p: after[p] for p in before} == before
    assert len(after) == len(before) + 9
    assert after[original.replace(".png", "-near.jpg")] == before[original]
    again = project.run("visionops", "import-labels", str(reviewed)).stdout
    assert "skipped                  9" in again and "dvc repro" not in again
    assert json.loads(project.run("dvc", "status", "--json", "download").stdout) == {}


def test_voc_without_a_class_list_checks_names_against_data_roots_objects_and_refuses_image_sets(tmp_path):
    root, reviewed = _dense("voc", tmp_path)
    (root / "labels.txt").unlink()  # the classes are then the names in data.root's xmls
    xml = reviewed / "Annotations" / f"{REVIEWED[0]}.xml"
    xml.write_text(xml.read_text().replace("<name>", "<name>cat", 1))
    with pytest.raises(InvalidInputError, match=rf"{REVIEWED[0]}.png object 0: class cat\d"):
        import_labels(_params("voc", root), reviewed)
    (root / "ImageSets" / "Main").mkdir(parents=True)
    with pytest.raises(InvalidInputError, match=r"lists its images in ImageSets/Main/\*.txt"):
        import_labels(_params("voc", root), reviewed)


def test_an_interrupted_import_leaves_whole_files_and_a_rerun_finishes_it(tmp_path, monkeypatch):
    root, reviewed = _dense("masks", tmp_path)
    record, copied = tmp_path / "imports.csv", []
    real = shutil.copyfile

    def dies_on_the_fifth(src, dst):
        if len(copied) == 4:
            raise OSError("disk full")
        copied.append(src)
        return real(src, dst)

    monkeypatch.setattr(shutil, "copyfile", dies_on_the_fifth)
    with pytest.raises(OSError, match="disk full"):
        import_labels(_params("masks", root), reviewed, record=record)
    monkeypatch.setattr(shutil, "copyfile", real)
    assert len(_record(record)) == 16  # listed first
    assert not [p for p in root.rglob(".*.tmp")]  # no half-written file
    masks = sorted(p.name for p in (root / "masks").iterdir() if p.stem in REVIEWED)
    assert masks == [f"{n}.png" for n in REVIEWED[:4]]
    assert not any((root / "images" / f"{n}.png").exists() for n in REVIEWED)  # masks first: no image without one
    done = import_labels(_params("masks", root), reviewed, record=record)
    assert (done["imported"], done["skipped"], done["label_files"]) == (8, 0, 4)
    assert len(_record(record)) == 16
    assert all((root / "images" / f"{n}.png").is_file() for n in REVIEWED)
