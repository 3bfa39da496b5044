"""Detection's scoring: per-class AP at IoU .5 and over [.5:.95] as COCO computes them, mAP over every
ranked detection whatever the served cap, and validate's warning for images above that cap."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from visionops.config import DetectionConfig, ValidateConfig
from visionops.data import dataset
from visionops.models.detection import CenterNet
from visionops.tasks.detection import detector
from visionops.tasks.detection.evaluate import score_split
from visionops.tasks.detection.metrics import MAP_MAX_DETECTIONS, mean_average_precision

NAMES = ["a", "b", "c"]


def _random_case(seed: int = 0, images: int = 12):
    """True boxes and noisy, partly wrong predictions of them, with false detections."""
    rng = np.random.default_rng(seed)
    preds, true = [], []
    for _ in range(images):
        n = int(rng.integers(1, 6))
        xy = rng.uniform(0, 40, (n, 2))
        boxes = np.concatenate([xy, xy + rng.uniform(6, 20, (n, 2))], 1).astype(np.float32)
        labels = rng.integers(0, len(NAMES), n)
        true.append({"boxes": boxes, "labels": labels})
        jitter = boxes + rng.normal(0, 2.5, boxes.shape).astype(np.float32)
        extra = np.concatenate([xy[:1] + 10, xy[:1] + 22], 1).astype(np.float32)
        flipped = np.where(rng.random(n) < 0.2, (labels + 1) % len(NAMES), labels)
        preds.append({"boxes": np.concatenate([jitter, extra]), "scores": rng.uniform(0.05, 1, n + 1).astype(np.float32),
                      "labels": np.concatenate([flipped, rng.integers(0, len(NAMES), 1)])})
    return preds, true


def test_per_class_ap_at_iou_half_and_over_the_coco_range_are_torchmetrics_own():
    from torchmetrics.detection import MeanAveragePrecision

    preds, true = _random_case()
    r = mean_average_precision(preds, true, NAMES)

    def reference(**kw) -> dict[str, float]:
        m = MeanAveragePrecision(backend="faster_coco_eval", class_metrics=True, **kw)
        m.update([{k: torch.as_tensor(v) for k, v in p.items()} for p in preds],
                 [{k: torch.as_tensor(v) for k, v in t.items()} for t in true])
        out = m.compute()
        return {NAMES[int(c)]: float(ap) for c, ap in zip(out["classes"], out["map_per_class"])}

    ap50, ap = reference(iou_thresholds=[0.5]), reference()
    assert set(r["per_class_ap50"]) == set(r["per_class_ap"]) == set(NAMES)
    assert r["per_class_ap50"] == pytest.approx(ap50, abs=1e-6)
    assert r["per_class_ap"] == pytest.approx(ap, abs=1e-6)
    assert all(r["per_class_ap50"][c] >= r["per_class_ap"][c] for c in NAMES)  # .5 is the loosest threshold
    assert r["per_class_ap50"] != pytest.approx(r["per_class_ap"], abs=1e-3)  # the two are different numbers


class _FixedMaps(CenterNet):
    """A CenterNet whose raw output is `maps` for every image: its decoding is the real one."""

    def __init__(self, maps: torch.Tensor, num_classes: int):
        super().__init__(1, num_classes, width=4)
        self.register_buffer("maps", maps)

    def forward(self, x):
        return self.maps.expand(len(x), -1, -1, -1)


def test_map_scores_every_detection_whatever_the_served_cap():
    """One image with 30 objects, found exactly, and a served cap of 5: the served detections stop at 5, and
    mAP still scores all 30 (mAP@.5 1.0, where the 5 served ones would score 5/30)."""
    k, stride, cells = len(NAMES), CenterNet.stride, 24
    maps = torch.zeros(1, k + 4, cells, cells)
    maps[:, :k] = -10.0  # sigmoid ~ 0 everywhere but the objects' centres
    maps[:, k : k + 2] = float(np.log(1.5))  # boxes 1.5 cells (6 px) wide and high, centred on their cell
    centres = [(x, y) for y in range(1, cells, 3) for x in range(1, cells, 3)][:30]
    true_boxes, true_labels = [], []
    for i, (x, y) in enumerate(centres):
        maps[0, i % k, y, x] = 5.0 - 0.01 * i  # distinct scores
        true_boxes.append([(x - 0.75) * stride, (y - 0.75) * stride, (x + 0.75) * stride, (y + 0.75) * stride])
        true_labels.append(i % k)
    rule = DetectionConfig(max_detections=5)
    model = detector.Detector(_FixedMaps(maps, k), [0.0], [1.0], rule).eval()
    split = dataset.Split(np.zeros((1, cells * stride, cells * stride, 1), np.uint8), np.zeros(1, np.int64), ["0.png"],
                          targets={"boxes": np.asarray([true_boxes], np.float32), "box_labels": np.asarray([true_labels])})
    assert len(centres) == 30 > rule.max_detections and MAP_MAX_DETECTIONS >= 30

    scored = score_split(model, split, NAMES)
    (served,) = detector.predict(model, split.images)  # what the model serves: the rule's cap applies
    assert len(served["labels"]) == rule.max_detections
    assert all(np.array_equal(served[key], scored["served"][0][key]) for key in served)  # the verdicts judge those
    assert len(scored["ranked"][0]["labels"]) == 30  # what mAP scores
    assert scored["map_50"] == pytest.approx(1.0) and scored["per_class_ap50"] == pytest.approx(dict.fromkeys(NAMES, 1.0))
    capped = mean_average_precision(scored["served"], scored["true"], NAMES)
    assert capped["map_50"] < 0.5  # the served cap would have hidden 25 of the 30 objects


@pytest.mark.parametrize("cap", [1, 100])
def test_validate_warns_of_images_holding_more_objects_than_the_served_cap(tmp_path, cap):
    import dense_folders as F

    from visionops.data.download import run_download
    from visionops.tasks.detection.validate import run_validate

    run_download(F.cfg("coco", F.coco_folder(tmp_path / "coco")), tmp_path / "ds", None, task="detection", targets="boxes")
    most = int((dataset.load(tmp_path / "ds").splits["train"].targets["box_labels"] >= 0).sum(1).max())
    assert 1 < most < 100  # the canvases hold several objects per image
    summary = run_validate(tmp_path / "ds", ValidateConfig(), tmp_path / "reports", max_detections=cap)
    warned = [w for w in summary["warnings"] if "detection.max_detections" in w["check"]]
    assert summary["success"]
    if cap == 1:
        (w,) = warned
        assert w["check"] == "objects per image <= detection.max_detections (1), the served cap" and w["n_offending"] > 0
    else:
        assert warned == []
