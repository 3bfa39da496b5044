"""Detection's stages on a small in-process canvases dataset: prepare → train → evaluate → baseline →
distill, the written outputs, and the served rule stored in the model file."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
from detection_data import write_detection_dataset

from visionops.config import parse_params
from visionops.tasks.detection import detector
from visionops.tasks.detection.prepare import repeat_factors, resample

PARAMS = {
    "task": "detection",
    "data": {"source": "canvases", "image_size": 64},
    "balance": {"strategy": "repeat_factor", "repeat_threshold": 0.5},
    "augment": {"rotate_degrees": 0.0, "crop_padding": 0, "scale_jitter": 0.1, "translate": 0.05,
                "brightness": 0.2, "contrast": 0.2},
    "train": {"model": "centernet", "epochs": 4, "batch_size": 32, "optimizer": "adamw", "lr": 0.01,
              "eval_batch_size": 256, "device": "cpu"},
    "distill": {"student": "centernet_tiny", "epochs": 2, "lr": 0.01, "temperature": 2.0, "alpha": 0.5},
    "evaluate": {"gradcam_samples": 4, "gallery_size": 6, "latency_batch_size": 8},
}


def test_repeat_factors_follow_lvis():
    # class 0 in every image, class 1 in one image of four, class 2 nowhere
    labels = np.array([[0, 1], [0, -1], [0, -1], [0, -1]])
    per_class, per_image = repeat_factors(labels, 3, threshold=0.5)
    assert per_class[0] == 1.0 and per_class[1] == pytest.approx(np.sqrt(0.5 / 0.25)) and per_class[2] == 1.0
    assert per_image.tolist() == pytest.approx([np.sqrt(2), 1, 1, 1])
    counts = np.bincount(np.concatenate([resample(per_image, seed) for seed in range(400)]), minlength=4) / 400
    assert counts[0] == pytest.approx(np.sqrt(2), abs=0.06) and counts[1:].tolist() == [1, 1, 1]
    assert (resample(per_image, 3) == resample(per_image, 3)).all()  # seeded


def test_prepare_rejects_a_classification_strategy(tmp_path):
    from visionops.errors import InvalidInputError
    from visionops.tasks.detection.prepare import run_prepare

    ds = write_detection_dataset(tmp_path / "ds", (("train", 8), ("val", 4), ("test", 4)))
    p = parse_params({**PARAMS, "balance": {"strategy": "oversample"}})
    with pytest.raises(InvalidInputError, match="balance.strategy"):
        run_prepare(ds, p.balance, p.augment, tmp_path / "prep", tmp_path / "rep")


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    """prepare + train (4 epochs on 240 canvases) once for the tests below."""
    from visionops.tasks.detection.task import TASK

    torch.set_num_threads(2)
    root = tmp_path_factory.mktemp("det")
    ds = write_detection_dataset(root / "ds", (("train", 240), ("val", 40), ("test", 40)))
    holdout = write_detection_dataset(root / "holdout", (("holdout", 40),), seed=7)  # the audit's non-members
    p = parse_params(PARAMS)
    paths = {"root": root, "ds": ds, "prep": root / "prep", "model": root / "models" / "teacher.pt", "params": p,
             "holdout": holdout}
    paths["prepare"] = TASK.prepare(p, ds, paths["prep"], root / "reports" / "prepare")
    paths["train"] = TASK.train(p, ds, paths["prep"], paths["model"], root / "reports" / "train", root / "ck" / "train.pt")
    return paths


def test_prepare_writes_its_outputs(pipeline):
    rep = pipeline["root"] / "reports" / "prepare"
    with (rep / "class_distribution.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert [r["class_name"] for r in rows] == [str(d) for d in range(10)]
    idx = np.load(pipeline["prep"] / "train_indices.npy")
    assert len(idx) == pipeline["prepare"]["train_images_after"] >= 240  # t = 0.5 repeats the rarer classes' images
    assert sum(int(r["after"]) for r in rows) == pipeline["prepare"]["instances_after"]
    assert not (rep / "class_distribution.png").exists() and (rep / "summary.json").exists()  # DVC draws the csv
    assert json.loads((pipeline["prep"] / "policy.json").read_text())["augment"]["scale_jitter"] == 0.1


def test_train_writes_a_model_that_detects(pipeline):
    m = pipeline["train"]
    rep = pipeline["root"] / "reports" / "train"
    assert m["epochs_run"] == 4 and json.loads((rep / "metrics.json").read_text()) == {"best_val_map_50": m["best_val_map_50"]}
    # 4 epochs on 240 canvases: well above an untrained network (val mAP@.5 0.0 after epoch 1), far from the
    # target. The value depends on the CPU's kernels: 0.187 (test 0.228) on one machine, above 0.2 on another.
    assert m["best_val_map_50"] > 0.1
    assert "train_seconds" in json.loads((rep / "measured.json").read_text())
    with (rep / "history.csv").open() as fh:
        assert len(list(csv.DictReader(fh))) == 4
    model, info = detector.load(pipeline["model"])
    assert info["rule"] == pipeline["params"].detection.model_dump()
    raw = pipeline["model"].read_bytes()
    torch.load(pipeline["model"], weights_only=True)  # tensors and plain values only
    dets = detector.predict(model, np.zeros((2, 64, 64, 1), np.uint8))
    assert len(dets) == 2 and all(d["boxes"].shape[1] == 4 for d in dets)
    assert raw == pipeline["model"].read_bytes()


def test_evaluate_writes_the_fixed_outputs(pipeline):
    from visionops.tasks.detection.task import TASK

    rep = pipeline["root"] / "reports" / "evaluate"
    m = TASK.evaluate(pipeline["params"], pipeline["ds"], pipeline["model"], rep, pipeline["holdout"])
    assert 0.0 <= m["map"] <= m["map_50"] <= 1.0 and m["map_50"] > 0.1  # see test_train_writes_a_model_that_detects
    assert set(json.loads((rep / "metrics.json").read_text())) == {"map_50", "map", "source_map_50", "mia_auc",
                                                                   "mia_tpr_at_1pct_fpr"}
    # source boxes (objects.csv) are the canonical ones here: the detections mapped back score the same
    assert m["source_map_50"] == pytest.approx(m["map_50"], abs=1e-4) and m["source_map"] == pytest.approx(m["map"], abs=1e-4)
    assert m["mia_members"] == m["mia_nonmembers"] == 40 and 0 <= m["mia_loss_auc"] <= 1 and 0 <= m["mia_lira_auc"] <= 1
    for f in ("details.json", "per_class.json", "predictions.csv", "report.md", "report.html",
              "figures/pr_curves.png", "figures/detections.png", "figures/eigencam.png", "figures/membership_roc.png"):
        assert (rep / f).stat().st_size > 0, f
    assert "latency_batch_ms" not in json.loads((rep / "details.json").read_text())
    per_class = json.loads((rep / "per_class.json").read_text())  # AP@.5 (promotion's floor) and COCO's AP per class
    assert per_class and set(per_class) <= {str(d) for d in range(10)}
    assert all(set(v) == {"ap50", "ap"} and 0 <= v["ap"] <= v["ap50"] <= 1 for v in per_class.values())
    assert {c: v["ap50"] for c, v in per_class.items()} == m["per_class_ap50"]
    report = (rep / "report.md").read_text()
    assert "| class | AP@.5 | AP@[.5:.95] |" in report and "up to COCO's 100 per image" in report
    with (rep / "predictions.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    names = {str(d) for d in range(10)} | {"background"}
    assert rows and all(r["actual"] in names and r["predicted"] in names for r in rows)
    true_boxes = int((np.load(pipeline["ds"] / "test" / "box_labels.npy") >= 0).sum())
    assert sum(r["actual"] != "background" for r in rows) == true_boxes  # every true box appears once


def test_baseline_and_distill(pipeline):
    from visionops.tasks.detection.task import TASK

    root, p = pipeline["root"], pipeline["params"]
    base = TASK.baseline(p, pipeline["ds"], pipeline["prep"], pipeline["model"], root / "reports" / "baseline", root / "ck")
    assert base["student"] == "centernet_tiny" and 0.0 <= base["test_map_50"] <= 1.0
    m = TASK.distill(p, pipeline["ds"], pipeline["prep"], pipeline["model"], root / "models" / "student.pt",
                     root / "reports" / "distill", root / "ck", root / "reports" / "baseline" / "baseline.json",
                     holdout_dir=pipeline["holdout"])
    assert m["mia_members"] == 40 and 0 <= m["mia_auc"] <= 1
    assert "mia_auc" in json.loads((root / "reports" / "distill" / "metrics.json").read_text())
    assert m["onnx_parity"] is True and m["student_parameters"] < m["teacher_parameters"]
    assert m["kd_gain"] == pytest.approx(m["student_map_50"] - base["test_map_50"])
    for f in ("metrics.json", "details.json", "student.onnx", "student.int8.onnx", "report.md", "report.html",
              "history.csv"):
        assert (root / "reports" / "distill" / f).stat().st_size > 0, f
    assert not (root / "reports" / "distill" / "history.png").exists()  # dvc.yaml's charts draw history.csv
    # int8 (distill.quantize defaults to true): the fp32 ONNX maps, decoded by the same rule, score as PyTorch's did
    assert m["int8_method"] == "static_qdq_per_channel" and m["int8_bytes"] < m["onnx_bytes"]
    assert m["fp32_onnx_map_50"] == pytest.approx(m["student_map_50"], abs=0.01)
    assert 0 <= m["int8_map_50"] <= 1 and m["int8_map_50_drop"] == pytest.approx(m["fp32_onnx_map_50"] - m["int8_map_50"])
    details = json.loads((root / "reports" / "distill" / "details.json").read_text())
    assert "int8_speedup" not in details and details["int8_map_50"] == m["int8_map_50"]
    assert "int8 (`student.int8.onnx`, static" in (root / "reports" / "distill" / "report.md").read_text()
    _, info = detector.load(root / "models" / "student.pt")
    assert info["arch"] == "centernet_tiny"


def test_with_init_teacher_both_students_start_from_the_teachers_channels(pipeline, tmp_path, monkeypatch):
    from visionops.models.narrow import narrow_into
    from visionops.tasks.detection import train as train_module
    from visionops.tasks.detection.task import TASK

    teacher_net = detector.load(pipeline["model"])[0].net.state_dict()
    started: list[int] = []

    def spy(wide, narrow):
        assert all(torch.equal(v, teacher_net[k]) for k, v in wide.state_dict().items())
        narrow_into(wide, narrow)
        started.append(sum(p.numel() for p in narrow.parameters()))

    monkeypatch.setattr(train_module, "narrow_into", spy)
    p = parse_params({**PARAMS, "distill": {**PARAMS["distill"], "epochs": 1, "init": "teacher", "quantize": False}})
    for name in ("baseline", "distill"):
        (tmp_path / name).mkdir()
    base = TASK.baseline(p, pipeline["ds"], pipeline["prep"], pipeline["model"], tmp_path / "baseline", tmp_path / "ck")
    m = TASK.distill(p, pipeline["ds"], pipeline["prep"], pipeline["model"], tmp_path / "student.pt", tmp_path / "distill",
                     tmp_path / "ck", tmp_path / "baseline" / "baseline.json")
    tiny = sum(q.numel() for q in detector.load(tmp_path / "student.pt")[0].net.parameters())
    assert started == [tiny, tiny]  # centernet_tiny, in both stages
    assert base["init"] == m["init"] == "teacher" and m["kd_gain"] == pytest.approx(m["student_map_50"] - base["test_map_50"])
    assert "Both students started from the teacher's strongest channels" in (tmp_path / "distill" / "report.md").read_text()
