"""Readers stay inside data.root: a path an annotation, a setting or a symlink leads outside is refused by name,
for every reader and format, unless data.allowed_roots lists its folder (`visionops.data.roots`)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

import dense_folders as F
from conftest import write_image_folder
from visionops.config import DataConfig
from visionops.data import dataset
from visionops.data.download import run_download
from visionops.data.formats import write_png
from visionops.errors import InvalidInputError
from visionops.tasks import get_task

SECRET = np.full((F.SIZE, F.SIZE, 1), 77, np.uint8)  # a real PNG outside the root


@pytest.fixture
def outside(tmp_path) -> Path:
    """tmp/outside/secret.png, beside every data root the tests make under tmp/."""
    write_png(tmp_path / "outside" / "secret.png", SECRET)
    return tmp_path / "outside"


def _download(tmp_path, cfg: DataConfig, task: str = "detection") -> dataset.Dataset:
    run_download(cfg, tmp_path / "ds", tmp_path / "holdout", task=task, targets=get_task(task).targets)
    return dataset.load(tmp_path / "ds")


def _refused(tmp_path, cfg: DataConfig, *names: str, task: str = "detection") -> str:
    """download fails naming each of `names` and data.root, and writes nothing."""
    with pytest.raises(InvalidInputError) as info:
        _download(tmp_path, cfg, task)
    message = str(info.value)
    for name in (*names, f"outside data.root {Path(cfg.root).resolve()}", "data.allowed_roots"):
        assert name in message, (name, message)
    assert not (tmp_path / "ds").exists() and not (tmp_path / "holdout").exists()
    return message


def _set_file_name(root: Path, index: int, file_name: str) -> None:
    def edit(data):
        data["images"][index]["file_name"] = file_name

    F.edit_coco(root, edit)


@pytest.mark.parametrize("file_name", ["../outside/secret.png", "ABSOLUTE", "../../../../../../../../etc/passwd"])
def test_coco_file_name_outside_the_root_is_refused_by_name(tmp_path, outside, file_name):
    root = F.coco_folder(tmp_path / "coco")
    file_name = str(outside / "secret.png") if file_name == "ABSOLUTE" else file_name
    _set_file_name(root, 3, file_name)
    _refused(tmp_path, F.cfg("coco", root), f"{root / 'annotations.json'}: image id 4 file_name", file_name)


def test_coco_file_name_in_an_allowed_root_is_read(tmp_path, outside):
    root = F.coco_folder(tmp_path / "coco")
    _set_file_name(root, 3, "../outside/secret.png")
    ds = _download(tmp_path, F.cfg("coco", root, allowed_roots=[str(outside)]))
    split = ds.splits["train"]
    i = split.paths.index("../outside/secret.png")
    np.testing.assert_array_equal(split.images[i], SECRET)


def test_coco_symlinked_image_and_annotations_outside_are_refused(tmp_path, outside):
    root = F.coco_folder(tmp_path / "coco")
    image = root / "images" / f"{F.NAMES[5]}.png"
    image.unlink()
    image.symlink_to(outside / "secret.png")
    _refused(tmp_path, F.cfg("coco", root), "image id 6 file_name", str(image), str(outside / "secret.png"))

    other = F.coco_folder(tmp_path / "other")
    shutil.move(other / "annotations.json", outside / "annotations.json")
    (other / "annotations.json").symlink_to(outside / "annotations.json")
    _refused(tmp_path, F.cfg("coco", other), "data.annotations", str(other / "annotations.json"))
    _refused(tmp_path, F.cfg("coco", root, annotations="../outside/annotations.json"), "data.annotations")


def test_a_symlink_inside_the_root_is_read(tmp_path):
    root = F.coco_folder(tmp_path / "coco")
    image = root / "images" / f"{F.NAMES[5]}.png"
    shutil.move(image, root / "elsewhere.png")
    image.symlink_to(Path("..") / "elsewhere.png")
    ds = _download(tmp_path, F.cfg("coco", root))
    assert len(ds.splits["train"]) == len(F.CANV) and f"images/{F.NAMES[5]}.png" in ds.splits["train"].paths


def test_voc_filename_outside_the_root_is_refused_by_name(tmp_path, outside):
    root = F.voc_folder(tmp_path / "voc")
    xml = root / "Annotations" / f"{F.NAMES[2]}.xml"
    xml.write_text(xml.read_text().replace(f"{F.NAMES[2]}.png", "../../outside/secret.png"))
    _refused(tmp_path, F.cfg("voc", root), f"Annotations/{F.NAMES[2]}.xml: <filename>", "../../outside/secret.png")
    ds = _download(tmp_path, F.cfg("voc", root, allowed_roots=[str(outside)]))
    assert "JPEGImages/../../outside/secret.png" in ds.splits["train"].paths


def test_voc_image_set_id_outside_the_root_is_refused_by_name(tmp_path, outside):
    root = F.voc_folder(tmp_path / "voc")
    (outside / "evil.xml").write_text("<annotation><filename>x.png</filename></annotation>")
    (root / "ImageSets" / "Main").mkdir(parents=True)
    (root / "ImageSets" / "Main" / "train.txt").write_text(f"{F.NAMES[0]}\n../../outside/evil\n")
    _refused(tmp_path, F.cfg("voc", root), "VOC id '../../outside/evil'")


def test_yolo_folder_outside_the_root_is_refused_before_it_is_walked(tmp_path):
    root = F.yolo_folder(tmp_path / "yolo")
    (root / "data.yaml").write_text("train: /etc\nnames: ['0']\n")
    _refused(tmp_path, F.cfg("yolo", root), f"{root / 'data.yaml'}: train: /etc")
    (root / "data.yaml").write_text("path: ../..\ntrain: images/train\nnames: ['0']\n")
    _refused(tmp_path, F.cfg("yolo", root), f"{root / 'data.yaml'}: train")


def test_yolo_absolute_image_folder_inside_the_root_is_read(tmp_path):
    root = F.yolo_folder(tmp_path / "yolo")
    (root / "data.yaml").write_text(f"train: {root / 'images' / 'train'}\nnames: {F.DIGITS}\n")
    ds = _download(tmp_path, F.cfg("yolo", root))
    assert sorted(ds.splits["train"].paths) == [f"images/train/{n}.png" for n in F.NAMES]  # relative to data.root


def test_yolo_symlinked_image_or_label_outside_is_refused_by_name(tmp_path, outside):
    root = F.yolo_folder(tmp_path / "yolo")
    image = root / "images" / "train" / "z_secret.png"
    image.symlink_to(outside / "secret.png")
    _refused(tmp_path, F.cfg("yolo", root), f"{root / 'data.yaml'}: train", str(image))
    image.unlink()

    (outside / "passwd").write_text("root:x:0:0:root:/root:/bin/bash\n")
    label = root / "labels" / "train" / f"{F.NAMES[1]}.txt"
    label.unlink()
    label.symlink_to(outside / "passwd")
    message = _refused(tmp_path, F.cfg("yolo", root), "label file", str(label))
    assert "root:x" not in message  # the outside file's content is never read into the message


def test_png_masks_symlinked_image_or_mask_outside_is_refused_by_name(tmp_path, outside):
    root = F.masks_folder(tmp_path / "masks")
    image = root / "images" / "z_secret.png"
    image.symlink_to(outside / "secret.png")
    _refused(tmp_path, F.cfg("masks", root), str(image), task="segmentation")
    image.unlink()

    mask = root / "masks" / f"{F.NAMES[4]}.png"
    shutil.move(mask, outside / "mask.png")
    mask.symlink_to(outside / "mask.png")
    _refused(tmp_path, F.cfg("masks", root), f"mask of images/{F.NAMES[4]}.png", str(mask), task="segmentation")
    ds = _download(tmp_path, F.cfg("masks", root, allowed_roots=[str(outside)]), "segmentation")
    assert len(ds.splits["train"]) == len(F.CANV)


def test_folder_symlinked_file_or_folder_outside_is_refused_by_name(tmp_path, outside):
    root = write_image_folder(tmp_path / "photos", classes=("cat", "dog"), per_class=6)
    cfg = DataConfig(source="folder", root=str(root), channels=1, image_size=16)
    link = root / "train" / "cat" / "secret.png"
    link.symlink_to(outside / "secret.png")
    _refused(tmp_path, cfg, str(link), str(outside / "secret.png"), task="classification")
    ds = _download(tmp_path, cfg.model_copy(update={"allowed_roots": [str(outside)]}), "classification")
    assert "train/cat/secret.png" in ds.splits["train"].paths + ds.splits["val"].paths + ds.splits["test"].paths
    shutil.rmtree(tmp_path / "ds")
    shutil.rmtree(tmp_path / "holdout")
    link.unlink()

    for link in (root / "train" / "dog" / "more", root / "train" / "bird"):  # a folder inside a class; a class
        link.symlink_to(outside, target_is_directory=True)
        _refused(tmp_path, cfg, str(link), task="classification")
        link.unlink()


def test_a_symlink_loop_is_refused_by_name(tmp_path):
    root = write_image_folder(tmp_path / "photos", classes=("cat", "dog"), per_class=6)
    loop = root / "train" / "cat" / "loop.png"
    loop.symlink_to(loop)
    with pytest.raises(InvalidInputError, match="loop.png cannot be resolved"):
        _download(tmp_path, DataConfig(source="folder", root=str(root)), "classification")


def test_allowed_roots_is_a_data_setting(tmp_path):
    assert DataConfig().allowed_roots == []
    with pytest.raises(ValueError, match="allowed_roots"):
        DataConfig(allowed_roots="nope")
    assert json.loads(DataConfig(allowed_roots=["/a"]).model_dump_json())["allowed_roots"] == ["/a"]
