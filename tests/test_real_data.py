"""Real data as it comes: scores at the source resolution beside the training-size ones, class lists without a
background class, the overlays' legend and colours, and validate's pixel-imbalance warning (tiny data made here)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from test_letterbox import _cfg, _wide_masks_folder
from torch import nn

from visionops.config import ValidateConfig
from visionops.data import dataset
from visionops.data.dense import IGNORE, _canonical_mask
from visionops.data.download import run_download
from visionops.data.images import placement
from visionops.data.sources.masks import read_class_list
from visionops.errors import InvalidInputError
from visionops.tasks.detection.evaluate import score_at_source, source_truths
from visionops.tasks.detection.metrics import mean_average_precision, truths
from visionops.tasks.segmentation import plots
from visionops.tasks.segmentation.evaluate import score_at_source as seg_score_at_source
from visionops.tasks.segmentation.evaluate import score_masks
from visionops.tasks.segmentation.validate import run_validate


class Oracle(nn.Module):
    """A segmenter that reads each pixel's class from its value (100 per class): the canonical truth, exactly."""

    def __init__(self, k: int):
        super().__init__()
        self.k = k

    def forward(self, x):
        return nn.functional.one_hot((x[:, 0].long() // 100).clamp(max=self.k - 1), self.k).permute(0, 3, 1, 2).float()


def _oracle_images(masks: np.ndarray) -> np.ndarray:
    return np.where(masks == IGNORE, 0, masks.astype(np.int64) * 100).astype(np.uint8)[..., None]


def test_segmentation_scores_at_the_source_size_differ_from_the_training_size_where_resizing_loses_detail():
    rng = np.random.default_rng(0)
    source = np.zeros((4, 30, 90), np.uint8)
    for m in source:  # thin structures: a 1-pixel line and a small odd-edged block
        m[rng.integers(2, 28), :] = 1
        y, x = rng.integers(3, 20, 2)
        m[y : y + 7, x : x + 13] = 1
    canonical = np.stack([_canonical_mask(m, 2, 32, "letterbox")[0] for m in source])
    images = _oracle_images(canonical)
    where = [placement(90, 30, 32, "letterbox")] * len(source)
    trained = score_masks(Oracle(2)(torch.as_tensor(images).permute(0, 3, 1, 2)).argmax(1).numpy(), canonical,
                          ["background", "line"], 0.5)
    assert trained["miou"] == 1.0  # the oracle is exact at the training size
    at_source = seg_score_at_source(Oracle(2), images, where, list(source), 2, "cpu", 3)
    assert at_source["source_images"] == 4
    assert 0.5 < at_source["source_miou"] < 0.99 and at_source["source_pixel_accuracy"] < 1.0
    # mapped with the wrong rule (squash: the padding taken for image) the source scores collapse
    wrong = seg_score_at_source(Oracle(2), images, [placement(90, 30, 32, "squash")] * 4, list(source), 2, "cpu", 3)
    assert wrong["source_miou"] < at_source["source_miou"] - 0.1
    # stored at the source size, the source scores are the training-size ones
    same = seg_score_at_source(Oracle(2), _oracle_images(source[:, :30, :30]), [placement(30, 30, 30, "squash")] * 4,
                               list(source[:, :30, :30]), 2, "cpu", 3)
    assert same["source_miou"] == 1.0


def test_dataset_keeps_bounded_source_masks_of_test_only_when_they_are_not_the_canonical_ones(tmp_path, monkeypatch):
    masks = np.zeros((3, 8, 8), np.uint8)
    source = [np.ones((10, 20), np.uint8), np.ones((10, 20), np.uint8) * 2, np.ones((10, 20), np.uint8)]

    def save(root, source_masks):
        split = dataset.Split(np.zeros((3, 8, 8, 1), np.uint8), np.zeros(3, np.int64), ["a", "b", "c"],
                              targets={"masks": masks}, source_masks=source_masks)
        dataset.save(dataset.Dataset(["bg", "x", "y"], {"train": split, "test": split}, "masks", task="segmentation"), root)

    monkeypatch.setattr(dataset, "SOURCE_MASK_PIXELS", 450)  # two of the three 200-pixel masks
    save(tmp_path / "a", source)
    kept = dataset.source_masks(tmp_path / "a")
    assert len(kept) == 2 and all(np.array_equal(k, s) for k, s in zip(kept, source))
    assert not (tmp_path / "a" / "train" / "source_masks.npz").exists()
    save(tmp_path / "b", list(masks))  # the source masks are the canonical ones: nothing more is stored
    assert not (tmp_path / "b" / "test" / "source_masks.npz").exists()
    assert len(dataset.source_masks(tmp_path / "b")) == 3


def test_detection_scores_at_the_source_resolution_map_boxes_back_to_the_source_boxes(tmp_path):
    root, _, boxes = _wide_masks_folder(tmp_path / "src")
    voc = tmp_path / "voc"
    (voc / "Annotations").mkdir(parents=True)
    (voc / "JPEGImages").mkdir()
    for i, (x0, y0, x1, y1) in enumerate(boxes):
        Image.open(root / "images" / f"m{i}.png").save(voc / "JPEGImages" / f"m{i}.png")
        (voc / "Annotations" / f"m{i}.xml").write_text(
            f"<annotation><filename>m{i}.png</filename><object><name>box</name><bndbox><xmin>{x0}</xmin><ymin>{y0}"
            f"</ymin><xmax>{x1}</xmax><ymax>{y1}</ymax></bndbox></object></annotation>")
    run_download(_cfg(voc).model_copy(update={"source": "voc"}), tmp_path / "ds", None, "detection", "boxes")
    ds = dataset.load(tmp_path / "ds")
    split = ds.splits["train"]
    true = source_truths(tmp_path / "ds" / "train", split)
    assert [t["boxes"].tolist() for t in true] == [[list(map(float, boxes[int(p[-5])]))] for p in split.paths]
    canonical = truths(split.targets["boxes"], split.targets["box_labels"])
    ranked = [{**t, "scores": np.ones(len(t["labels"]), np.float32)} for t in canonical]
    assert mean_average_precision(ranked, canonical, ["box"])["map_50"] == 1.0
    assert score_at_source(ranked, ds.placements("train"), true, ["box"])["source_map_50"] == 1.0
    squashed = [placement(w, h, 48, "squash") for h, w, _ in split.orig_shapes]  # the wrong way back
    assert score_at_source(ranked, squashed, true, ["box"])["source_map_50"] < 0.5


def test_class_list_says_whether_class_0_is_background(tmp_path):
    path = tmp_path / "classes.txt"
    path.write_text("# background: none\n# CamVid, first class sky\nsky\nroad\n\ncar\n")
    assert read_class_list(path) == (["sky", "road", "car"], False)
    path.write_text("# Background: First\nvoid\ncar\n")
    assert read_class_list(path) == (["void", "car"], True)
    path.write_text("background\ncar\n")
    assert read_class_list(path) == (["background", "car"], True)
    path.write_text("sky\n# background: maybe\nroad\n")
    with pytest.raises(InvalidInputError, match=r"classes.txt:2: `# background:` must be one of first, none, got 'maybe'"):
        read_class_list(path)
    path.write_text("# background: none\nsky\n")
    with pytest.raises(InvalidInputError, match="needs at least two classes"):
        read_class_list(path)


def _no_background_dataset(tmp_path):
    root, masks, _ = _wide_masks_folder(tmp_path / "src")
    (root / "classes.txt").write_text("# background: none\nsky\nbox\nstrip\n")
    run_download(_cfg(root, resize="squash"), tmp_path / "ds", None, "segmentation", "masks")
    return tmp_path / "ds", masks


def test_a_class_list_without_background_makes_class_0_an_object_validated_and_counted(tmp_path):
    ds_dir, masks = _no_background_dataset(tmp_path)
    ds = dataset.load(ds_dir)
    assert not ds.background and json.loads((ds_dir / "meta.json").read_text())["background"] is False
    objects = (ds_dir / "train" / "objects.csv").read_text()
    assert ",0,sky,0," in objects  # class 0 is an object of every image
    assert set(ds.splits["train"].labels) == {0}  # and sky, the most pixels, each image's class
    summary = run_validate(ds_dir, ValidateConfig(), tmp_path / "validate")
    assert summary["success"] and summary["class_counts"]["train"] == {"sky": 4, "box": 4, "strip": 4}
    # the same folder with background first: class 0 is neither an object nor counted
    (tmp_path / "src" / "classes.txt").write_text("background\nbox\nstrip\n")
    run_download(_cfg(tmp_path / "src", resize="squash"), tmp_path / "ds2", None, "segmentation", "masks")
    assert dataset.load(tmp_path / "ds2").background
    assert "background" not in (tmp_path / "ds2" / "train" / "objects.csv").read_text()
    summary = run_validate(tmp_path / "ds2", ValidateConfig(), tmp_path / "validate2")
    assert summary["class_counts"]["train"] == {"box": 4, "strip": 4}


def test_validate_warns_on_pixel_imbalance_in_train(tmp_path):
    ds_dir, _ = _no_background_dataset(tmp_path)
    masks = dataset.load(ds_dir).splits["train"].targets["masks"]
    pixels = np.bincount(masks.ravel(), minlength=256)[:3]
    ratio = pixels.max() / pixels.min()
    assert ratio > 4  # sky against the thin strip
    summary = run_validate(ds_dir, ValidateConfig(max_pixel_imbalance_ratio=ratio - 0.01), tmp_path / "v1")
    assert summary["pixel_imbalance_ratio"] == round(ratio, 4)
    assert summary["class_pixels"] == dict(zip(["sky", "box", "strip"], pixels.tolist()))
    warned = [w for w in summary["warnings"] if w["check"].startswith("train pixel imbalance")]
    assert len(warned) == 1 and warned[0]["offending"] == ["sky"]
    assert json.loads((tmp_path / "v1" / "metrics.json").read_text())["pixel_imbalance_ratio"] == round(ratio, 4)
    summary = run_validate(ds_dir, ValidateConfig(max_pixel_imbalance_ratio=ratio + 0.01), tmp_path / "v2")
    assert not [w for w in summary["warnings"] if w["check"].startswith("train pixel imbalance")]


def test_overlays_have_a_legend_and_distinct_colours_and_honour_background(tmp_path):
    colours = plots.class_colours(32)
    assert len(set(colours)) == 32 and plots.IGNORED not in colours
    assert all(not (r == g == b) for r, g, b in colours[:18])  # no grey: the images are grey
    images = np.full((2, 16, 16, 1), 128, np.uint8)
    truth = np.zeros((2, 16, 16), np.uint8)
    truth[:, 4:8, 4:8] = 1
    truth[:, 10:, :] = IGNORE
    pred = np.zeros((2, 16, 16), np.uint8)
    pred[:, 0:3, :] = 2
    names = ["sky", "car", "road"]
    assert plots.overlays(images, truth, pred, names, tmp_path / "a.png") == ["car", "road", "ignored (255)"]
    assert plots.overlays(images, truth, pred, names, tmp_path / "b.png", background=False) == [
        "sky", "car", "road", "ignored (255)"]
    rgba = plots._colour(truth[0], 3, background=True)
    assert rgba[0, 0, 3] == 0 and rgba[5, 5, 3] > 0 and tuple(rgba[12, 0, :3]) == plots.IGNORED
    assert plots._colour(truth[0], 3, background=False)[0, 0, 3] > 0
    assert (tmp_path / "a.png").stat().st_size > 0
