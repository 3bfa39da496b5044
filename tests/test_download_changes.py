"""Tamper-evident data: download records each source file's SHA-256 (manifests, and a record DVC leaves alone);
a file changed under the same name fails the next download by name, added and removed files are listed."""

from __future__ import annotations

import csv
import hashlib
import json
import shutil

import numpy as np
import pytest
from PIL import Image

import dense_folders as F
from conftest import write_image_folder
from pipeline_project import Project
from visionops.config import DataConfig
from visionops.data import dataset
from visionops.data.changes import record_path
from visionops.data.download import run_download
from visionops.errors import InvalidInputError
from visionops.tasks import get_task


def _sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _repaint(path, value: int = 0) -> None:
    """New bytes under the same name: a valid image of the same size, other pixels."""
    with Image.open(path) as img:
        fmt, size, mode = img.format, img.size, img.mode
    Image.new(mode, size, value).save(path, format=fmt)


@pytest.fixture
def photos(tmp_path):
    return write_image_folder(tmp_path / "photos", classes=("cat", "dog"), per_class=30)


def _cfg(root, **kw) -> DataConfig:
    return DataConfig(source="folder", root=str(root), channels=3, image_size=16, **kw)


def test_manifests_and_record_hold_each_files_sha256(tmp_path, photos):
    run_download(_cfg(photos), tmp_path / "ds", tmp_path / "holdout")
    parts = {**dataset.load(tmp_path / "ds").splits, **dataset.load(tmp_path / "holdout").splits}
    seen = {}
    for name, split in parts.items():
        assert len(split) and len(split.sha256) == len(split), name
        seen |= dict(zip(split.paths, split.sha256))
    assert len(seen) == 60 and all(digest == _sha256(photos / path) for path, digest in seen.items())
    with (tmp_path / "ds" / "train" / "manifest.csv").open() as fh:
        assert "sha256" in next(csv.reader(fh))
    record = json.loads(record_path(tmp_path / "ds").read_text())
    assert record == {"source": "folder", "root": str(photos.resolve()), "sha256": seen}
    assert record_path(tmp_path / "ds") == tmp_path / "ds.sha256.json"


def test_a_changed_file_fails_by_name_until_accepted_with_warn(tmp_path, photos, capsys):
    run_download(_cfg(photos), tmp_path / "ds", tmp_path / "holdout")
    record = record_path(tmp_path / "ds").read_text()
    before = (tmp_path / "ds" / "train" / "manifest.csv").read_text()
    _repaint(photos / "train" / "dog" / "dog_004.jpg")
    with pytest.raises(InvalidInputError, match=r"1 file\(s\) changed .*: train/dog/dog_004\.jpg; .*on_changed_file"):
        run_download(_cfg(photos), tmp_path / "ds", tmp_path / "holdout")
    assert record_path(tmp_path / "ds").read_text() == record  # the record is kept: the next try fails too
    assert (tmp_path / "ds" / "train" / "manifest.csv").read_text() == before
    with pytest.raises(InvalidInputError, match="dog_004"):
        run_download(_cfg(photos), tmp_path / "ds", tmp_path / "holdout")

    capsys.readouterr()
    run_download(_cfg(photos, on_changed_file="warn"), tmp_path / "ds", tmp_path / "holdout")
    assert "download: warning: data.root" in capsys.readouterr().err
    run_download(_cfg(photos), tmp_path / "ds", tmp_path / "holdout")  # accepted: recorded
    assert "changed" not in capsys.readouterr().err


def test_added_and_removed_files_are_listed_not_refused(tmp_path, photos, capsys):
    run_download(_cfg(photos), tmp_path / "ds")
    shutil.copy(photos / "train" / "cat" / "cat_001.jpg", photos / "train" / "dog" / "new.jpg")
    _repaint(photos / "train" / "dog" / "new.jpg", 9)
    (photos / "train" / "cat" / "cat_002.jpg").unlink()
    capsys.readouterr()
    run_download(_cfg(photos), tmp_path / "ds")
    err = capsys.readouterr().err
    assert "1 file(s) added (train/dog/new.jpg) and 1 removed (train/cat/cat_002.jpg)" in err
    assert "changed" not in err


def test_the_error_names_twenty_changed_files_then_counts(tmp_path, photos):
    run_download(_cfg(photos), tmp_path / "ds")
    for i in range(25):
        _repaint(photos / "train" / "cat" / f"cat_{i:03d}.{'png' if i % 3 == 0 else 'jpg'}", i)
    with pytest.raises(InvalidInputError) as info:
        run_download(_cfg(photos), tmp_path / "ds")
    message = str(info.value)
    assert "25 file(s) changed" in message and message.count("train/cat/") == 20 and "and 5 more" in message


def test_another_root_or_source_is_not_compared(tmp_path, photos):
    run_download(_cfg(photos), tmp_path / "ds")
    other = shutil.copytree(photos, tmp_path / "other")
    _repaint(other / "train" / "dog" / "dog_004.jpg")
    run_download(_cfg(other), tmp_path / "ds")  # another data.root: a new dataset, not a changed one
    run_download(DataConfig(), tmp_path / "ds")  # digits: no files, and the record stays
    assert json.loads(record_path(tmp_path / "ds").read_text())["root"] == str(other.resolve())


def test_a_dense_sources_changed_image_fails_by_name(tmp_path):
    root = F.coco_folder(tmp_path / "coco")
    task = get_task("detection")
    run_download(F.cfg("coco", root), tmp_path / "ds", None, task=task.name, targets=task.targets)
    image = root / "images" / f"{F.NAMES[7]}.png"
    Image.fromarray(np.zeros((F.SIZE, F.SIZE), np.uint8)).save(image)
    with pytest.raises(InvalidInputError, match=f"images/{F.NAMES[7]}.png"):
        run_download(F.cfg("coco", root), tmp_path / "ds", None, task=task.name, targets=task.targets)


ANNOTATION = {"coco": "annotations.json", "voc": f"Annotations/{F.NAMES[3]}.xml",
              "yolo": f"labels/train/{F.NAMES[3]}.txt", "masks": f"masks/{F.NAMES[3]}.png"}


@pytest.mark.parametrize("source", sorted(ANNOTATION))
def test_a_changed_annotation_file_fails_by_name(tmp_path, source):
    root = getattr(F, f"{source}_folder")(tmp_path / source)
    task = get_task("segmentation" if source == "masks" else "detection")
    run_download(F.cfg(source, root), tmp_path / "ds", None, task=task.name, targets=task.targets)
    changed = root / ANNOTATION[source]
    if source == "coco":
        F.edit_coco(root, lambda data: data["annotations"][0]["bbox"].__setitem__(0, 1.5))
    elif source == "voc":
        changed.write_text(changed.read_text().replace("<difficult>0</difficult>", "<difficult>1</difficult>", 1))
    elif source == "yolo":
        text = changed.read_text()
        changed.write_text(("2" if text[0] == "1" else "1") + text[1:])  # another class
    else:
        Image.fromarray(np.zeros((F.SIZE, F.SIZE), np.uint8)).save(changed)
    with pytest.raises(InvalidInputError, match=rf"1 file\(s\) changed .*: {ANNOTATION[source]};"):
        run_download(F.cfg(source, root), tmp_path / "ds", None, task=task.name, targets=task.targets)


def test_dvc_repro_of_download_fails_on_a_changed_file_and_lists_an_added_one(tmp_path, photos):
    """DVC deletes data/dataset before it reruns download: the comparison works from the record beside it."""
    project = Project(tmp_path / "project")
    project.set_params(data={"source": "folder", "root": str(photos), "channels": 3, "image_size": 16})
    project.repro("download")
    assert (project.path / "data" / "dataset.sha256.json").is_file()
    victim = photos / "train" / "cat" / "cat_007.jpg"
    original = victim.read_bytes()
    _repaint(victim)
    failed = project.repro("-f", "download", check=False)  # -f: data.root is not a DVC dependency
    assert failed.returncode != 0 and "train/cat/cat_007.jpg" in failed.stderr + failed.stdout
    assert not (project.path / "data" / "dataset").exists()  # DVC removed the outputs before the command ran

    victim.write_bytes(original)
    shutil.copy(photos / "train" / "dog" / "dog_001.jpg", photos / "train" / "dog" / "extra.jpg")
    _repaint(photos / "train" / "dog" / "extra.jpg", 5)
    done = project.repro("-f", "download")
    assert "1 file(s) added (train/dog/extra.jpg) and 0 removed" in done.stderr + done.stdout
    paths = [p for s in dataset.load(project.path / "data" / "dataset").splits.values() for p in s.paths]
    paths += dataset.load(project.path / "data" / "holdout").splits["holdout"].paths
    assert "train/dog/extra.jpg" in paths
