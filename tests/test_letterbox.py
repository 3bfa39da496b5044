"""data.resize letterbox: the geometry (boxes and masks there and back), the sources that store it, and serving,
which applies the rule stored in the model file."""

from __future__ import annotations

import json

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from visionops.config import DataConfig, DetectionConfig
from visionops.data import dataset
from visionops.data.dense import IGNORE
from visionops.data.download import run_download
from visionops.data.formats import write_index_masks, write_png
from visionops.data.images import placement, to_canonical
from visionops.tasks.detection import detector
from visionops.tasks.detection.served import ImageDetectorModel
from visionops.tasks.segmentation import segmenter
from visionops.tasks.segmentation.serving import SegmenterModel, decode_mask, log_segmenter

SHAPES = [(200, 100), (100, 200), (37, 91), (640, 480), (64, 64), (9, 500)]


@pytest.mark.parametrize(("width", "height"), SHAPES)
def test_letterbox_keeps_the_aspect_ratio_centred_and_boxes_map_back_exactly(width, height):
    p = placement(width, height, 64, "letterbox")
    assert max(p.size) == 64 and abs(p.size[0] * height - p.size[1] * width) <= max(width, height) / 2  # short side rounded
    assert abs(2 * p.offset[0] + p.size[0] - 64) <= 1 and abs(2 * p.offset[1] + p.size[1] - 64) <= 1
    boxes = np.array([[0, 0, width, height], [width * 0.25, height * 0.5, width * 0.75, height * 0.9]])
    canon = p.boxes_to_canonical(boxes)
    np.testing.assert_allclose(canon[0], [*p.offset, p.offset[0] + p.size[0], p.offset[1] + p.size[1]], atol=1e-9)
    np.testing.assert_allclose(p.boxes_to_source(canon), boxes, atol=1e-9)


def test_squash_is_the_old_resize():
    p = placement(200, 100, 64, "squash")
    assert (p.size, p.offset) == ((64, 64), (0, 0))
    np.testing.assert_allclose(p.boxes_to_canonical([[20, 10, 100, 50]]), [[6.4, 6.4, 32, 32]])
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (100, 200), np.uint8))
    np.testing.assert_array_equal(to_canonical(img, 64, 1)[..., 0], np.asarray(img.resize((64, 64), Image.Resampling.BILINEAR)))


def test_letterboxed_image_is_padded_black_where_the_placement_says():
    img = Image.new("RGB", (200, 100), (255, 255, 255))
    out = to_canonical(img, 64, 3, "letterbox")
    p = placement(200, 100, 64, "letterbox")
    assert p.offset == (0, 16) and p.size == (64, 32)
    assert (out[:16] == 0).all() and (out[48:] == 0).all() and (out[16:48] == 255).all()


def _wide_masks_folder(root, n=4, width=120, height=40):
    """Images of width x height with a bright rectangle, its class-1 mask, and a class-2 strip."""
    rng = np.random.default_rng(0)
    images, masks, boxes = [], [], []
    for i in range(n):
        x0, y0 = 10 + 7 * i, 5 + 2 * i
        x1, y1 = x0 + 50, y0 + 20
        img = rng.integers(20, 80, (height, width, 1), np.uint8)
        img[y0:y1, x0:x1] = 220
        mask = np.zeros((height, width), np.uint8)
        mask[y0:y1, x0:x1] = 1
        mask[:, -6:] = 2
        images.append(img)
        masks.append(mask)
        boxes.append((x0, y0, x1, y1))
    write_index_masks(root, [f"m{i}" for i in range(n)], np.stack(images), np.stack(masks), ["background", "box", "strip"])
    return root, masks, boxes


def _cfg(root, resize: str = "letterbox") -> DataConfig:
    """Everything in train (no carving): image i of the folder is train image i."""
    return DataConfig(source="masks", root=str(root), image_size=48, resize=resize, val_fraction=0.0,
                      test_fraction=0.0, holdout_fraction=0.0, cache_dir=str(root / "cache"))


def test_masks_are_letterboxed_with_the_padding_ignored_and_map_back_within_a_pixel(tmp_path):
    root, masks, _ = _wide_masks_folder(tmp_path / "src")
    run_download(_cfg(root), tmp_path / "ds", None, "segmentation", "masks")
    ds = dataset.load(tmp_path / "ds")
    assert ds.resize == "letterbox"
    train = ds.splits["train"]
    for i, where in enumerate(ds.placements("train")):
        assert where.size == (48, 16) and where.offset == (0, 16)
        stored = train.targets["masks"][i]
        assert (stored[:16] == IGNORE).all() and (stored[32:] == IGNORE).all()
        assert (train.images[i][:16] == 0).all() and (train.images[i][32:] == 0).all()
        back = np.asarray(Image.fromarray(where.crop(stored)).resize(where.source, Image.Resampling.NEAREST))
        scale = where.source[0] / where.size[0]  # source pixels per canonical pixel
        for c in (1, 2):
            ys, xs = np.nonzero(masks[i] == c)
            ys2, xs2 = np.nonzero(back == c)
            for a, b in ((xs.min(), xs2.min()), (xs.max(), xs2.max()), (ys.min(), ys2.min()), (ys.max(), ys2.max())):
                assert abs(int(a) - int(b)) <= scale


def test_voc_boxes_are_letterboxed_like_their_image(tmp_path):
    root = tmp_path / "voc"
    _, _, boxes = _wide_masks_folder(tmp_path / "src")
    for i, (x0, y0, x1, y1) in enumerate(boxes):
        write_png(root / "JPEGImages" / f"m{i}.png", np.asarray(Image.open(tmp_path / "src" / "images" / f"m{i}.png")))
        (root / "Annotations").mkdir(parents=True, exist_ok=True)
        (root / "Annotations" / f"m{i}.xml").write_text(
            f"<annotation><filename>m{i}.png</filename><object><name>box</name><bndbox><xmin>{x0}</xmin><ymin>{y0}</ymin>"
            f"<xmax>{x1}</xmax><ymax>{y1}</ymax></bndbox></object></annotation>")
    cfg = _cfg(root).model_copy(update={"source": "voc"})
    run_download(cfg, tmp_path / "ds", None, "detection", "boxes")
    ds = dataset.load(tmp_path / "ds")
    train = ds.splits["train"]
    for i, where in enumerate(ds.placements("train")):
        source_box = np.array(boxes[int(train.paths[i][len("JPEGImages/m")])], np.float64)
        got = train.targets["boxes"][i, 0]
        np.testing.assert_allclose(got, [source_box[0] * 0.4, 16 + source_box[1] * 0.4, source_box[2] * 0.4,
                                         16 + source_box[3] * 0.4], atol=1e-4)
        np.testing.assert_allclose(where.boxes_to_source(got[None])[0], source_box, atol=1e-3)
        x0, y0, x1, y1 = np.round(got).astype(int)  # the bright rectangle is where the box says
        assert train.images[i][y0 + 1 : y1 - 1, x0 + 1 : x1 - 1].min() > 150


def test_served_detector_letterboxes_its_input_and_answers_in_input_pixels(tmp_path):
    torch.manual_seed(0)
    rule = DetectionConfig(score_threshold=0.0, max_detections=5)
    model = detector.build("centernet_tiny", ["a", "b"], (64, 64, 1), [0.3], [0.2], rule).eval()
    path = tmp_path / "det.pt"
    detector.save(path, model, "centernet_tiny", ["a", "b"], (64, 64, 1), resize="letterbox")
    served = ImageDetectorModel().load(path)
    assert served.resize == "letterbox"
    wide = np.random.default_rng(1).integers(0, 256, (50, 150, 1), np.uint8)
    canonical = to_canonical(Image.fromarray(wide[..., 0]), 64, 1, "letterbox")
    np.testing.assert_array_equal(served.canonical(wide), canonical)
    out = served.predict_values([wide])
    boxes = np.array(json.loads(out["detections"][0])["boxes"])
    expected = placement(150, 50, 64, "letterbox").boxes_to_source(detector.predict(model, canonical[None])[0]["boxes"])
    assert len(boxes) == 5
    np.testing.assert_allclose(boxes, expected, atol=0.01)


def test_a_model_file_without_a_resize_serves_squashed(tmp_path):
    model = segmenter.build("unet_small", ["background", "x"], (32, 32, 1), [0.5], [0.25]).eval()
    segmenter.save(tmp_path / "old.pt", model, "unet_small", ["background", "x"], (32, 32, 1))
    served = SegmenterModel().load(tmp_path / "old.pt")
    wide = np.random.default_rng(2).integers(0, 256, (20, 60), np.uint8)
    assert served.resize == "squash"
    np.testing.assert_array_equal(served.canonical(wide), to_canonical(Image.fromarray(wide), 32, 1))


def test_registered_segmenter_letterboxes_and_answers_a_mask_of_the_input_size(tmp_path, monkeypatch):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment(experiment_id=mlflow.create_experiment("seg", artifact_location=(tmp_path / "a").as_uri()))
    torch.manual_seed(0)
    model = segmenter.build("unet_small", ["background", "x", "y"], (32, 32, 1), [0.5], [0.25]).eval()
    path = tmp_path / "seg.pt"
    segmenter.save(path, model, "unet_small", ["background", "x", "y"], (32, 32, 1), resize="letterbox")
    with mlflow.start_run():
        log_segmenter(path, "seg", tags={})
    served = mlflow.pyfunc.load_model("models:/seg@challenger")
    wide = np.random.default_rng(3).integers(0, 256, (30, 90), np.uint8)
    out = served.predict(pd.DataFrame({"image": [wide]}))
    mask = decode_mask(out["mask"][0])
    assert mask.shape == (30, 90) and out["error"][0] == ""
    canonical = to_canonical(Image.fromarray(wide), 32, 1, "letterbox")
    logits = segmenter.predict_logits(model, canonical[None])[0]
    where = placement(90, 30, 32, "letterbox")
    np.testing.assert_array_equal(mask, segmenter.source_mask(logits, where))
    # the padded rows (a third of the square above and below the image) are never part of the answer
    squashed = torch.nn.functional.interpolate(logits[None], size=(30, 90), mode="bilinear").argmax(1)[0].numpy()
    assert not np.array_equal(mask, squashed)


def test_folder_images_are_letterboxed_and_the_classifier_serves_them_so(tmp_path):
    from visionops.serving.pyfunc import ImageClassifierModel
    from visionops.tasks.classification import classifier

    for c, cls in enumerate(("a", "b")):
        for i in range(3):
            write_png(tmp_path / "tree" / cls / f"{i}.png", np.full((20, 60, 3), 100 + 50 * c + i, np.uint8))
    cfg = DataConfig(source="folder", root=str(tmp_path / "tree"), image_size=30, channels=3, resize="letterbox",
                     val_fraction=0.0, test_fraction=0.0, holdout_fraction=0.0)
    run_download(cfg, tmp_path / "ds", None)
    ds = dataset.load(tmp_path / "ds")
    images = np.asarray(ds.splits["train"].images)
    assert ds.resize == "letterbox" and (images[:, :10] == 0).all() and (images[:, 20:] == 0).all()
    assert (images[:, 10:20] >= 100).all()
    model = classifier.build("lenet", ["a", "b"], (30, 30, 3), [0.5] * 3, [0.25] * 3)
    classifier.save(tmp_path / "m.pt", model, "lenet", ["a", "b"], (30, 30, 3), **ds.model_record())
    served = ImageClassifierModel().load(tmp_path / "m.pt")
    wide = np.full((20, 60, 3), 120, np.uint8)
    np.testing.assert_array_equal(served.canonical(wide), to_canonical(Image.fromarray(wide), 30, 3, "letterbox"))
