"""The detectors: CenterNet decoding, torchvision's detectors (build, one training step, predict), the
label shift, box-aware augmentation and the matching behind the confusion table."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from visionops.config import AugmentConfig, DetectionConfig
from visionops.model_names import models_for
from visionops.models import create_model, list_models
from visionops.models.detection import CenterNet, decode_centernet
from visionops.tasks.detection import detector
from visionops.tasks.detection.augment import BoxAugment
from visionops.tasks.detection.metrics import confusion_rows, image_correct, match

BOXES = torch.tensor([[[8.0, 12.0, 28.0, 36.0], [40.0, 4.0, 60.0, 24.0], [0, 0, 0, 0]]])
LABELS = torch.tensor([[3, 7, -1]])


def test_detection_models_are_registered_for_the_task():
    assert sorted(models_for("detection")) == list_models("detection") == [
        "centernet", "centernet_tiny", "fasterrcnn_mobilenet_v3_large_320_fpn", "ssdlite320_mobilenet_v3_large"]


def test_centernet_targets_decode_back_to_the_boxes():
    net = CenterNet(1, 10, width=8)
    out = torch.zeros(1, 14, 16, 16)
    heat, index, reg, valid = net.targets(out, BOXES, LABELS)
    assert valid.tolist() == [[True, True, False]] and heat.max() == 1
    # a perfect output: logits high exactly at the objects' cells, their sizes and offsets there
    perfect = torch.full((1, 14, 16, 16), -10.0)
    flat = perfect.flatten(2)
    for m in range(2):
        flat[0, LABELS[0, m], index[0, m]] = 10.0
        flat[0, 10:, index[0, m]] = reg[0, m]
    dets = decode_centernet(perfect, 10, 4, 0.3, 0.5, 20)
    boxes, _, labels = dets[0]
    order = labels.argsort()
    assert labels[order].tolist() == [3, 7]
    assert torch.allclose(boxes[order], BOXES[0, :2], atol=1e-4)


def test_centernet_loss_is_finite_and_learns():
    torch.manual_seed(0)
    net = CenterNet(1, 10, width=8)
    x = torch.rand(1, 1, 64, 64)
    opt = torch.optim.Adam(net.parameters(), 1e-2)
    losses = []
    for _ in range(20):
        loss = net.loss(x, net(x), BOXES, LABELS)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert np.isfinite(losses).all() and losses[-1] < losses[0] / 2


@pytest.mark.parametrize("arch", ["fasterrcnn_mobilenet_v3_large_320_fpn", "ssdlite320_mobilenet_v3_large"])
def test_torchvision_detector_trains_a_step_and_predicts(arch):
    torch.manual_seed(0)
    model = detector.build(arch, [str(d) for d in range(10)], (64, 64, 1), [0.3], [0.2], DetectionConfig(score_threshold=0.0))
    x = torch.rand(2, 1, 64, 64)
    boxes = torch.cat([BOXES, BOXES])
    labels = torch.tensor([[3, 7, -1], [0, -1, -1]])  # class 0 must survive the shift to torchvision's label 1
    model.train()
    loss = model.loss(model(x), (boxes, labels), x)
    loss.backward()
    assert torch.isfinite(loss)
    model.eval()
    dets = model.detect(x)
    assert len(dets) == 2
    for b, s, lab in dets:
        assert b.shape[1] == 4 and len(b) == len(s) == len(lab) <= 20
        assert ((lab >= 0) & (lab < 10)).all()  # background (0) never comes out; ids shifted back


def test_label_shift_round_trip():
    """torchvision's label 1 is our class 0: a box the net calls label 1 comes back as class 0."""
    model = detector.build("fasterrcnn_mobilenet_v3_large_320_fpn", ["a", "b"], (64, 64, 1), [0.5], [0.2], DetectionConfig())
    out = [{"boxes": BOXES[0, :2], "scores": torch.tensor([0.9, 0.8]), "labels": torch.tensor([1, 2])}]
    ((_, _, lab),) = model.net.detect(out, 0.5, 0.5, 20)
    assert sorted(lab.tolist()) == [0, 1]


def test_augment_moves_boxes_with_the_ink():
    """A bright square moved by flip, zoom and shift keeps its box around it."""
    x = torch.zeros(4, 1, 64, 64)
    x[:, :, 10:30, 6:22] = 1.0
    boxes = torch.tensor([[6.0, 10.0, 22.0, 30.0]]).expand(4, 1, 4).clone()
    labels = torch.zeros(4, 1, dtype=torch.long)
    aug = BoxAugment(AugmentConfig(hflip=True, scale_jitter=0.3, translate=0.1))
    y, (b, lab) = aug(x, (boxes, labels), torch.Generator().manual_seed(1))
    for i in range(4):
        ys, xs = torch.nonzero(y[i, 0] > 0.5, as_tuple=True)
        ink = torch.tensor([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]).float()
        assert torch.allclose(b[i, 0], ink, atol=1.5), (b[i, 0], ink)
    assert (lab == 0).all()


def test_matching_and_confusion():
    true = {"boxes": np.array([[0, 0, 10, 10], [20, 20, 30, 30]], np.float32), "labels": np.array([1, 2])}
    pred = {"boxes": np.array([[0, 0, 10, 11], [40, 40, 50, 50], [20, 20, 30, 30]], np.float32),
            "scores": np.array([0.9, 0.8, 0.7]), "labels": np.array([1, 0, 3])}
    pairs, missed, extra = match(pred, true)
    assert sorted(pairs) == [(0, 0), (1, 2)] and missed == [] and extra == [1]
    rows = confusion_rows([pred], [true], ["a", "b", "c", "d"])
    assert sorted(rows) == sorted([("b", "b"), ("c", "d"), ("background", "a")])
    assert not image_correct(pred, true)
    right = {k: v[[0, 2]] for k, v in pred.items()}
    right["labels"] = np.array([1, 2])
    assert image_correct(right, true)
    assert confusion_rows([{k: v[:0] for k, v in pred.items()}], [true], ["a", "b", "c", "d"]) == [("b", "background"), ("c", "background")]


def test_model_file_round_trip_keeps_the_rule(tmp_path):
    rule = DetectionConfig(score_threshold=0.4, iou_threshold=0.6, max_detections=7)
    model = detector.build("centernet_tiny", ["0", "1"], (64, 64, 1), [0.3], [0.2], rule)
    detector.save(tmp_path / "m.pt", model, "centernet_tiny", ["0", "1"], (64, 64, 1))
    first = (tmp_path / "m.pt").read_bytes()
    detector.save(tmp_path / "m.pt", model, "centernet_tiny", ["0", "1"], (64, 64, 1))
    assert (tmp_path / "m.pt").read_bytes() == first  # reproducible bytes
    loaded, info = detector.load(tmp_path / "m.pt")
    assert loaded.rule == rule and info["arch"] == "centernet_tiny"
    x = torch.randint(0, 255, (2, 1, 64, 64), dtype=torch.uint8)
    assert torch.equal(loaded(x), model.eval()(x))


def test_create_model_builds_detectors_by_name():
    net = create_model("centernet", in_channels=1, num_classes=10, image_size=64)
    assert net(torch.rand(2, 1, 64, 64)).shape == (2, 14, 16, 16)


def test_class_agnostic_nms_keeps_one_box_per_place():
    from visionops.models.detection import _nms

    boxes = torch.tensor([[0.0, 0, 10, 10], [0.5, 0, 10, 10], [30, 30, 40, 40]])
    scores, labels = torch.tensor([0.9, 0.8, 0.7]), torch.tensor([1, 7, 1])
    assert _nms(boxes, scores, labels, 0.3, 0.5, 20)[2].tolist() == [1, 7, 1]  # per class: both 1 and 7 stay
    b, s, lab = _nms(boxes, scores, labels, 0.3, 0.5, 20, class_agnostic=True)
    assert lab.tolist() == [1, 1] and s.tolist() == pytest.approx([0.9, 0.7])
    assert len(_nms(boxes, scores, labels, 0.75, 0.5, 20)[0]) == 2  # the score threshold first
