"""Detection and segmentation data in the standard formats (COCO, VOC, YOLO, PNG masks), written from the
canvases, read by `download` into the canonical dataset and passed by `validate`; and the canvases source."""

from __future__ import annotations

import numpy as np
import pytest
from pycocotools import mask as coco_mask

import dense_folders as F
from visionops.config import DataConfig, ValidateConfig
from visionops.data import dataset
from visionops.data.download import run_download
from visionops.tasks import get_task
from visionops.tasks.detection.validate import run_validate as validate_detection
from visionops.tasks.segmentation.validate import run_validate as validate_segmentation


def _download(tmp_path, cfg, task):
    run_download(cfg, tmp_path / "ds", tmp_path / "holdout", task=task, targets=get_task(task).targets)
    return dataset.load(tmp_path / "ds")


def _order(split) -> list[int]:
    """The canvas index of each stored image (files are named c_<index>)."""
    return [int(p.rsplit("_", 1)[1].split(".")[0]) for p in split.paths]


def _assert_boxes(split, scale: float, atol: float = 1e-4):
    assert len(split) == len(F.CANV)
    for i, j in enumerate(_order(split)):
        n = int((F.CANV.labels[j] >= 0).sum())
        np.testing.assert_allclose(split.targets["boxes"][i, :n], F.CANV.boxes[j, :n] * scale, atol=atol)
        np.testing.assert_array_equal(split.targets["box_labels"][i, :n], F.CANV.labels[j, :n])
        assert (split.targets["box_labels"][i, n:] == -1).all()
        assert split.labels[i] == np.bincount(F.CANV.labels[j, :n]).argmax()  # the dominant class


@pytest.mark.parametrize("image_size", [F.SIZE, 32])
def test_coco_detection_round_trip_and_validate(tmp_path, image_size):
    ds = _download(tmp_path, F.cfg("coco", F.coco_folder(tmp_path / "coco"), image_size), "detection")
    assert ds.task == "detection" and ds.class_names == F.DIGITS and ds.image_shape == (image_size, image_size, 1)
    _assert_boxes(ds.splits["train"], image_size / F.SIZE)
    if image_size == F.SIZE:
        np.testing.assert_array_equal(ds.splits["train"].images, F.CANV.images[_order(ds.splits["train"])])
    summary = validate_detection(tmp_path / "ds", ValidateConfig(), tmp_path / "reports")
    assert summary["success"] and summary["objects"] == int((F.CANV.labels >= 0).sum())
    assert (tmp_path / "reports" / "metrics.json").is_file() and (tmp_path / "reports" / "class_counts.csv").is_file()


def test_voc_round_trip_and_validate(tmp_path):
    ds = _download(tmp_path, F.cfg("voc", F.voc_folder(tmp_path / "voc")), "detection")
    assert ds.class_names == F.DIGITS
    _assert_boxes(ds.splits["train"], 1.0, atol=0)
    assert validate_detection(tmp_path / "ds", ValidateConfig(), tmp_path / "reports")["success"]


def test_yolo_round_trip_and_validate(tmp_path):
    ds = _download(tmp_path, F.cfg("yolo", F.yolo_folder(tmp_path / "yolo")), "detection")
    assert ds.class_names == F.DIGITS
    _assert_boxes(ds.splits["train"], 1.0, atol=1e-3)  # 6 decimals of the normalised centre and size
    assert validate_detection(tmp_path / "ds", ValidateConfig(), tmp_path / "reports")["success"]


def test_png_masks_round_trip_and_validate(tmp_path):
    ds = _download(tmp_path, F.cfg("masks", F.masks_folder(tmp_path / "masks")), "segmentation")
    split = ds.splits["train"]
    assert ds.class_names == ["background", *F.DIGITS]
    np.testing.assert_array_equal(split.targets["masks"], F.CANV.masks[_order(split)])
    assert validate_segmentation(tmp_path / "ds", ValidateConfig(), tmp_path / "reports")["success"]


def test_png_masks_resize_nearest(tmp_path):
    ds = _download(tmp_path, F.cfg("masks", F.masks_folder(tmp_path / "masks"), image_size=24), "segmentation")
    masks = ds.splits["train"].targets["masks"]
    assert masks.shape == (len(F.CANV), 24, 24)
    assert set(np.unique(masks)) <= set(np.unique(F.CANV.masks))  # nearest: no blended values


def test_coco_rle_segmentation_round_trip(tmp_path):
    root = F.coco_folder(tmp_path / "coco", F.rle_segmentations())
    ds = _download(tmp_path, F.cfg("coco", root), "segmentation")
    split = ds.splits["train"]
    assert ds.class_names == ["background", *F.DIGITS]
    np.testing.assert_array_equal(split.targets["masks"], F.CANV.masks[_order(split)])
    assert validate_segmentation(tmp_path / "ds", ValidateConfig(), tmp_path / "reports")["success"]


def test_coco_polygons_are_painted_later_over_earlier(tmp_path):
    """Each object a rectangle polygon over its box: the class mask is pycocotools' rendering, later over earlier."""
    polys = [[[[float(v) for v in (b[0], b[1], b[2], b[1], b[2], b[3], b[0], b[3])]] for b in boxes[labels >= 0]]
             for boxes, labels in zip(F.CANV.boxes, F.CANV.labels)]
    ds = _download(tmp_path, F.cfg("coco", F.coco_folder(tmp_path / "coco", polys)), "segmentation")
    split = ds.splits["train"]
    for i, j in enumerate(_order(split)):
        expected = np.zeros((F.SIZE, F.SIZE), np.uint8)
        for poly, label in zip(polys[j], F.CANV.labels[j][F.CANV.labels[j] >= 0]):
            rle = coco_mask.merge(coco_mask.frPyObjects(poly, F.SIZE, F.SIZE))
            expected[coco_mask.decode(rle).astype(bool)] = 1 + label
        np.testing.assert_array_equal(split.targets["masks"][i], expected)


def test_coco_split_folders_are_kept(tmp_path):
    root = tmp_path / "coco"
    F.coco_folder(root / "train")
    F.coco_folder(root / "val")
    ds = _download(tmp_path, F.cfg("coco", root), "detection")
    assert len(ds.splits["train"]) == len(ds.splits["val"]) == len(F.CANV)
    assert ds.splits["val"].paths[0].startswith("val/images/")


@pytest.mark.parametrize("task", ["detection", "segmentation"])
def test_canvases_are_written_in_a_standard_format_and_read_back(tmp_path, task):
    cfg = DataConfig(source="canvases", image_size=64, cache_dir=str(tmp_path / "cache"), canvases={"count": 60})
    a = run_download(cfg, tmp_path / "a", None, task=task, targets=get_task(task).targets)
    (folder,) = (tmp_path / "cache").iterdir()
    assert folder.name.startswith(f"canvases-{get_task(task).targets}-")
    written = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}
    assert "images/canvas_00000.png" in written
    assert ("annotations.json" if task == "detection" else "masks/canvas_00000.png") in written
    b = run_download(cfg, tmp_path / "b", None, task=task, targets=get_task(task).targets)  # reuses the cache
    assert a == b and sorted(p.name for p in (tmp_path / "cache").iterdir()) == [folder.name]
    da, db = dataset.load(tmp_path / "a"), dataset.load(tmp_path / "b")
    for name in dataset.SPLITS:
        np.testing.assert_array_equal(da.splits[name].images, db.splits[name].images)
        for key, array in da.splits[name].targets.items():
            np.testing.assert_array_equal(array, db.splits[name].targets[key])
    # the targets read back are the generator's, image for image
    from visionops.data.canvases import make_canvases

    canv = make_canvases(60, 64, cfg.seed)
    split = da.splits["train"]
    idx = [int(p.rsplit("_", 1)[1].split(".")[0]) for p in split.paths]
    np.testing.assert_array_equal(split.images, canv.images[idx])
    if task == "detection":
        m = split.targets["box_labels"].shape[1]
        assert (canv.labels[idx][:, m:] == -1).all()
        np.testing.assert_array_equal(split.targets["box_labels"], canv.labels[idx][:, :m])
        np.testing.assert_array_equal(split.targets["boxes"], canv.boxes[idx][:, :m])
    else:
        np.testing.assert_array_equal(split.targets["masks"], canv.masks[idx])
    summary = (validate_detection if task == "detection" else validate_segmentation)(
        tmp_path / "a", ValidateConfig(), tmp_path / "reports")
    assert summary["success"] and summary["images"] == sum(map(len, da.splits.values()))
