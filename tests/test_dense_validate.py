"""A broken box, an unknown class id, a mask of the wrong size, bad mask values and an undecodable file each
fail `validate`, with a message naming the file and the object; the reports are written all the same."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

import dense_folders as F
from visionops.config import ValidateConfig
from visionops.data.download import run_download
from visionops.errors import ValidationFailed
from visionops.tasks import get_task
from visionops.tasks.detection.validate import run_validate as validate_detection
from visionops.tasks.segmentation.validate import run_validate as validate_segmentation


def _fails(tmp_path, cfg, task) -> ValidationFailed:
    run_download(cfg, tmp_path / "ds", None, task=task, targets=get_task(task).targets)
    validate = validate_detection if task == "detection" else validate_segmentation
    with pytest.raises(ValidationFailed) as info:
        validate(tmp_path / "ds", ValidateConfig(), tmp_path / "reports")
    for name in ("summary.json", "manifest.csv", "class_counts.csv", "metrics.json"):
        assert (tmp_path / "reports" / name).is_file()
    assert json.loads((tmp_path / "reports" / "metrics.json").read_text())["success"] is False
    return info.value


def _first_ann(data, image_id: int, k: int) -> dict:
    return [a for a in data["annotations"] if a["image_id"] == image_id][k]


def test_coco_box_outside_the_image_fails_naming_file_and_object(tmp_path):
    root = F.coco_folder(tmp_path / "coco")
    F.edit_coco(root, lambda d: _first_ann(d, 3, 0).update(bbox=[40.0, 5.0, 30.0, 20.0]))  # x1 = 70 > 48
    exc = _fails(tmp_path, F.cfg("coco", root), "detection")
    assert "train/images/c_00002.png object 0: box [40, 5, 70, 25] outside the 48x48 image" in exc.message
    assert [f["check"] for f in exc.summary["critical_failures"]] == ["box x1 <= image width"]
    # the canonical boxes leave the broken one out
    boxes = np.load(tmp_path / "ds" / "train" / "box_labels.npy")
    assert (boxes >= -1).all() and (boxes < 10).all()


def test_coco_box_without_area_fails(tmp_path):
    root = F.coco_folder(tmp_path / "coco")
    F.edit_coco(root, lambda d: _first_ann(d, 1, 0).update(bbox=[10.0, 5.0, 0.0, 20.0]))
    exc = _fails(tmp_path, F.cfg("coco", root), "detection")
    assert "train/images/c_00000.png object 0: box [10, 5, 10, 25] has no area" in exc.message


def test_coco_unknown_category_fails_naming_file_and_object(tmp_path):
    root = F.coco_folder(tmp_path / "coco")
    n = sum(1 for a in json.loads((root / "annotations.json").read_text())["annotations"] if a["image_id"] == 5)
    F.edit_coco(root, lambda d: _first_ann(d, 5, n - 1).update(category_id=99))
    exc = _fails(tmp_path, F.cfg("coco", root), "detection")
    assert f"train/images/c_00004.png object {n - 1}: class id 99 (no name) is not in the class set" in exc.message
    assert exc.summary["n_unknown_class_objects"] == 1


def test_yolo_unknown_class_and_box_outside_fail(tmp_path):
    root = F.yolo_folder(tmp_path / "yolo")
    (root / "labels" / "train" / "c_00001.txt").write_text("12 0.5 0.5 0.2 0.2\n3 0.95 0.5 0.2 0.2\n")
    exc = _fails(tmp_path, F.cfg("yolo", root), "detection")
    assert "images/train/c_00001.png object 0: class id 12 (no name) is not in the class set" in exc.message
    assert "images/train/c_00001.png object 1: box [40.8, 19.2, 50.4, 28.8] outside the 48x48 image" in exc.message


def test_voc_unknown_class_name_fails(tmp_path):
    root = F.voc_folder(tmp_path / "voc")
    xml = root / "Annotations" / "c_00006.xml"
    xml.write_text(xml.read_text().replace("<name>", "<name>cat", 1))
    exc = _fails(tmp_path, F.cfg("voc", root), "detection")
    assert "train/JPEGImages/c_00006.png object 0: class id cat" in exc.message


def test_mask_of_the_wrong_size_fails_naming_the_file(tmp_path):
    root = F.masks_folder(tmp_path / "masks")
    Image.fromarray(F.CANV.masks[7][:40]).save(root / "masks" / "c_00007.png")  # 48 wide, 40 high
    exc = _fails(tmp_path, F.cfg("masks", root), "segmentation")
    assert "train/images/c_00007.png: mask 48x40 does not match the 48x48 image" in exc.message


def test_mask_values_outside_the_class_set_fail(tmp_path):
    root = F.masks_folder(tmp_path / "masks")
    bad = F.CANV.masks[2].copy()
    bad[:4, :4] = 40
    Image.fromarray(bad).save(root / "masks" / "c_00002.png")
    exc = _fails(tmp_path, F.cfg("masks", root), "segmentation")
    assert "train/images/c_00002.png: mask values 40 are not in the class set (or 255)" in exc.message
    assert "class id 40" in exc.message  # also an object of an unknown class
    masks = np.load(tmp_path / "ds" / "train" / "masks.npy")
    assert masks.max() == 255 and set(np.unique(masks)) <= set(range(11)) | {255}  # kept sane: ignored


def test_undecodable_image_is_named(tmp_path):
    root = F.masks_folder(tmp_path / "masks")
    (root / "images" / "c_00011.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    exc = _fails(tmp_path, F.cfg("masks", root), "segmentation")
    assert "train/images/c_00011.png: UnidentifiedImageError" in exc.message
    assert exc.summary["n_rejected"] == 1
    # PIL names the file by its absolute path; the files DVC hashes name it relative to data.root
    assert "cannot identify image file 'images/c_00011.png'" in (tmp_path / "ds" / "rejected.csv").read_text()
    for f in (tmp_path / "ds" / "rejected.csv", *(tmp_path / "reports" / n for n in ("manifest.csv", "summary.json"))):
        assert str(root) not in f.read_text(), f


def test_images_without_objects_are_counted_as_a_warning(tmp_path):
    root = F.coco_folder(tmp_path / "coco")
    F.edit_coco(root, lambda d: d.update(annotations=[a for a in d["annotations"] if a["image_id"] != 4]))
    run_download(F.cfg("coco", root), tmp_path / "ds", None, task="detection", targets="boxes")
    summary = validate_detection(tmp_path / "ds", ValidateConfig(), tmp_path / "reports")
    assert summary["success"] and summary["empty_images"] == 1
    (empty,) = [w for w in summary["warnings"] if w["check"] == "image has objects"]
    assert empty["offending"] == ["train/images/c_00003.png: has no objects"]
