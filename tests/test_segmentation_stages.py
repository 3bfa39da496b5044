"""Segmentation's stages on a small in-process canvases dataset: prepare, train, evaluate, baseline, distill,
the pyfunc model and the registry hooks (real torch training, a real sqlite MLflow store)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from visionops.config import parse_params
from visionops.data import dataset
from visionops.data.canvases import make_canvases
from visionops.errors import InvalidInputError
from visionops.models.narrow import narrow_into
from visionops.tasks import get_task

CLASS_NAMES = ["background", *(str(d) for d in range(10))]


def canvases_dataset(root: Path, n: int = 60, seed: int = 0) -> Path:
    c = make_canvases(n, 64, seed=seed)
    dominant = np.array([np.bincount(r[r >= 0], minlength=10).argmax() for r in c.labels])
    cuts = {"train": slice(0, n * 7 // 10), "val": slice(n * 7 // 10, n * 8 // 10), "test": slice(n * 8 // 10, n)}
    splits = {
        k: dataset.Split(c.images[s], dominant[s], [f"{k}/{i}.png" for i in range(len(dominant[s]))], targets={"masks": c.masks[s]})
        for k, s in cuts.items()
    }
    dataset.save(dataset.Dataset(CLASS_NAMES, splits, "canvases", task="segmentation"), root)
    return root


def params(**over):
    raw = {
        "task": "segmentation",
        "data": {"source": "canvases", "image_size": 64},
        "balance": {"strategy": "class_weights"},
        "augment": {"scale_jitter": 0.1, "translate": 0.0625, "brightness": 0.2},
        "train": {"model": "unet", "epochs": 2, "batch_size": 16, "optimizer": "adamw", "lr": 0.005, "device": "cpu", "threads": 1},
        "distill": {"student": "unet_small", "epochs": 1, "lr": 0.005},
    }
    for key, value in over.items():
        raw[key] = {**raw.get(key, {}), **value}
    return parse_params(raw)


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    """prepare → train → evaluate → baseline → distill on 60 canvases."""
    root = tmp_path_factory.mktemp("seg")
    ds_dir = canvases_dataset(root / "dataset")
    holdout = dataset.load(canvases_dataset(root / "other", n=30, seed=9)).splits["train"]  # 21 unseen canvases
    dataset.save(dataset.Dataset(CLASS_NAMES, {"holdout": holdout}, "canvases", task="segmentation"), root / "holdout")
    p, task = params(), get_task("segmentation")
    out = {"root": root, "ds": ds_dir, "params": p}
    for name in ("prepare", "train", "evaluate", "baseline", "distill"):
        (root / "reports" / name).mkdir(parents=True)
    out["prepare"] = task.prepare(p, ds_dir, root / "prepared", root / "reports/prepare")
    out["train"] = task.train(p, ds_dir, root / "prepared", root / "teacher.pt", root / "reports/train", root / "ckpt.pt")
    out["evaluate"] = task.evaluate(p, ds_dir, root / "teacher.pt", root / "reports/evaluate", root / "holdout")
    out["baseline"] = task.baseline(p, ds_dir, root / "prepared", root / "teacher.pt", root / "reports/baseline", root)
    out["distill"] = task.distill(p, ds_dir, root / "prepared", root / "teacher.pt", root / "student.pt",
                                  root / "reports/distill", root, root / "reports/baseline/baseline.json",
                                  holdout_dir=root / "holdout")
    return out


def test_prepare_records_median_frequency_pixel_weights(pipeline):
    root = pipeline["root"]
    weights = json.loads((root / "prepared/loss.json").read_text())["pixel_weights"]
    assert len(weights) == 11 and weights[0] < 0.5 < min(w for w in weights[1:] if w > 0)  # background is the common class
    rows = list(csv.DictReader((root / "reports/prepare/class_distribution.csv").open()))
    assert [r["class_name"] for r in rows] == CLASS_NAMES and int(rows[0]["before"]) > int(rows[1]["before"])
    assert not (root / "reports/prepare/class_distribution.png").exists()  # dvc.yaml's bar chart draws the csv
    assert json.loads((root / "reports/prepare/summary.json").read_text())["strategy"] == "class_weights"


def test_prepare_refuses_a_resampling_strategy(tmp_path):
    ds_dir = canvases_dataset(tmp_path / "ds", n=20)
    with pytest.raises(InvalidInputError, match="balance.strategy"):
        get_task("segmentation").prepare(params(balance={"strategy": "oversample"}), ds_dir, tmp_path / "p", tmp_path)


def test_train_writes_a_weights_only_model_and_reports(pipeline):
    root = pipeline["root"]
    info = torch.load(root / "teacher.pt", weights_only=True)
    assert info["arch"] == "unet" and info["class_names"] == CLASS_NAMES
    metrics = json.loads((root / "reports/train/metrics.json").read_text())
    assert set(metrics) == {"best_val_miou"} and 0 <= metrics["best_val_miou"] <= 1
    assert "val_miou" in (root / "reports/train/history.csv").read_text().splitlines()[0]


def test_evaluate_reports_miou_per_class_and_sampled_pixels(pipeline):
    rep = pipeline["root"] / "reports/evaluate"
    metrics = json.loads((rep / "metrics.json").read_text())
    assert set(metrics) == {"miou", "pixel_accuracy", "dice", "source_miou", "mia_auc", "mia_tpr_at_1pct_fpr"}
    # the canvases are stored at their source size: the source-resolution scores are the training-size ones
    assert metrics["source_miou"] == pytest.approx(metrics["miou"], abs=1e-12)
    assert pipeline["evaluate"]["source_images"] == pipeline["evaluate"]["images"]
    assert 0 <= metrics["mia_auc"] <= 1 and pipeline["evaluate"]["mia_members"] == pipeline["evaluate"]["mia_nonmembers"] == 21
    per_class = json.loads((rep / "per_class.json").read_text())
    assert list(per_class) == CLASS_NAMES
    rows = list(csv.DictReader((rep / "predictions.csv").open()))
    assert 1000 < len(rows) <= 4000 and set(rows[0]) == {"actual", "predicted"}
    assert {r["actual"] for r in rows} <= set(CLASS_NAMES)
    for fig in ("overlays.png", "per_class_iou.png", "eigencam.png", "membership_roc.png"):
        assert (rep / "figures" / fig).stat().st_size > 0
    assert "figures/overlays.png" in (rep / "report.md").read_text() and (rep / "report.html").exists()
    assert "figures/eigencam.png" in (rep / "report.md").read_text()
    assert "## Membership-inference audit" in (rep / "report.md").read_text()
    student = json.loads((pipeline["root"] / "reports/distill/metrics.json").read_text())
    assert 0 <= student["mia_auc"] <= 1 and "## Membership-inference audit" in (pipeline["root"] / "reports/distill/report.md").read_text()
    assert "latency_batch_ms" not in json.loads((rep / "details.json").read_text())


def test_metrics_match_a_hand_count():
    from visionops.tasks.segmentation.metrics import segmentation_metrics

    truth = torch.tensor([[[0, 0, 1, 1], [0, 2, 2, 255]]], dtype=torch.uint8)
    pred = torch.tensor([[[0, 1, 1, 1], [0, 2, 0, 2]]], dtype=torch.uint8)
    m = segmentation_metrics(pred, truth, ["background", "a", "b"])
    # background: tp 2, fp 1, fn 1 → 2/4; a: tp 2, fp 1 → 2/3; b: tp 1, fn 1 → 1/2 (the 255 pixel is ignored)
    assert m["per_class"]["background"]["iou"] == pytest.approx(0.5)
    assert m["per_class"]["a"]["iou"] == pytest.approx(2 / 3)
    assert m["per_class"]["b"]["iou"] == pytest.approx(0.5)
    assert m["miou"] == pytest.approx((0.5 + 2 / 3 + 0.5) / 3)
    assert m["pixel_accuracy"] == pytest.approx(5 / 7)


def test_metrics_equal_torchmetrics_and_per_image_miou_equals_scoring_each_image_alone():
    from torchmetrics.classification import MulticlassAccuracy, MulticlassF1Score, MulticlassJaccardIndex

    from visionops.tasks.segmentation.metrics import image_miou, segmentation_metrics

    g = torch.Generator().manual_seed(0)
    truth = torch.randint(0, 4, (6, 16, 16), generator=g, dtype=torch.uint8)  # class 4 never occurs
    pred = torch.where(torch.rand(6, 16, 16, generator=g) < 0.7, truth, torch.randint(0, 4, (6, 16, 16), generator=g).to(torch.uint8))
    truth[:, :2] = 255  # ignored rows
    names = ["background", "a", "b", "c", "never"]
    m = segmentation_metrics(pred, truth, names)
    kw = {"ignore_index": 255}
    iou = MulticlassJaccardIndex(5, average="none", **kw)(pred.long(), truth.long())
    dice = MulticlassF1Score(5, average="none", multidim_average="global", **kw)(pred.long(), truth.long())
    for i, name in enumerate(names[:4]):
        assert m["per_class"][name]["iou"] == pytest.approx(float(iou[i]), abs=1e-6)
        assert m["per_class"][name]["dice"] == pytest.approx(float(dice[i]), abs=1e-6)
    assert m["per_class"]["never"]["iou"] is None  # torchmetrics scores it 0; it is left out of the mean
    assert m["miou"] == pytest.approx(float(iou[:4].mean()), abs=1e-6)
    assert m["dice"] == pytest.approx(float(dice[:4].mean()), abs=1e-6)
    assert m["pixel_accuracy"] == pytest.approx(float(MulticlassAccuracy(5, average="micro", **kw)(pred.long(), truth.long())), abs=1e-6)
    alone = [segmentation_metrics(p[None], t[None], names)["miou"] for p, t in zip(pred, truth)]
    assert image_miou(pred, truth, 5) == pytest.approx(alone, abs=1e-12)


def test_eigencam_maps_are_turned_so_that_the_objects_are_hot():
    from visionops.evaluation.eigencam import orient_to_objects

    maps = np.array([[[0.0, 1.0], [1.0, 1.0]], [[1.0, 0.0], [0.0, 0.0]]])
    objects = np.array([[[True, False], [False, False]]] * 2)
    out = orient_to_objects(maps, objects)
    np.testing.assert_array_equal(out[0], 1 - maps[0])  # its object was the coolest pixel: turned
    np.testing.assert_array_equal(out[1], maps[1])  # already hot: kept
    np.testing.assert_array_equal(orient_to_objects(maps, np.zeros_like(objects)), maps)  # no object: kept


def test_pixel_kd_is_zero_for_identical_logits_and_scaled_by_t_squared():
    from visionops.tasks.segmentation.losses import pixel_kd_loss

    s, t = torch.randn(2, 5, 4, 4), torch.randn(2, 5, 4, 4)
    assert pixel_kd_loss(s, s, 3.0).item() == pytest.approx(0.0, abs=1e-6)
    assert pixel_kd_loss(s, t, 1.0).item() > 0


def test_pixel_kd_weighs_pixels_by_their_true_class_and_ignores_ignore():
    from visionops.tasks.segmentation.losses import pixel_kd_loss

    torch.manual_seed(0)
    s, t = torch.randn(1, 2, 2, 2), torch.randn(1, 2, 2, 2)
    masks = torch.tensor([[[0, 0], [1, 255]]], dtype=torch.uint8)
    t[0, :, 1, 0] = s[0, :, 1, 0]  # the one class-1 pixel: teacher and student agree
    assert pixel_kd_loss(s, t, 2.0, masks, torch.tensor([0.0, 1.0])).item() == pytest.approx(0.0, abs=1e-6)
    assert pixel_kd_loss(s, t, 2.0, masks, torch.tensor([1.0, 0.0])).item() > 0
    t[0, :, 0] = s[0, :, 0]  # now every counted pixel agrees; only the IGNORE pixel differs
    assert pixel_kd_loss(s, t, 2.0, masks).item() == pytest.approx(0.0, abs=1e-6)


def test_distillation_targets_are_the_teachers_logits_before_its_prior_correction():
    from visionops.tasks.segmentation.losses import PixelDistillationLoss, PixelLoss
    from visionops.tasks.segmentation.segmenter import build

    torch.manual_seed(0)
    teacher = build("unet_small", ["background", "a"], (8, 8, 1), [0.5], [0.25]).eval()
    x = torch.rand(2, 1, 8, 8)
    with torch.no_grad():
        raw = teacher(x)
        teacher.logit_bias.copy_(torch.tensor([3.0, -3.0]).view(1, 2, 1, 1))  # a strong served correction
    masks = torch.zeros(2, 8, 8, dtype=torch.uint8)
    kd_only = PixelDistillationLoss(PixelLoss([0.5, 1.0]), teacher, alpha=1.0, temperature=2.0)
    assert kd_only(raw, masks, x).item() == pytest.approx(0.0, abs=1e-5)  # the student matching the raw logits


def test_augment_moves_masks_with_images():
    from visionops.tasks.segmentation.augment import MaskAugment

    x = torch.zeros(4, 1, 32, 32)
    x[:, :, 8:16, 8:16] = 1.0
    masks = (x[:, 0] > 0.5).to(torch.uint8)
    out, out_masks = MaskAugment(hflip=True, scale_jitter=0.2, translate=0.0625)(x, masks, torch.Generator().manual_seed(0))
    inside = out_masks == 1
    assert inside.any() and (out[:, 0][inside] > 0.5).float().mean() > 0.9  # labelled pixels stay on the square
    assert not torch.equal(out_masks, masks)


def test_augment_resamples_masks_with_images_to_a_smaller_size():
    from visionops.tasks.segmentation.augment import MaskAugment

    x = torch.zeros(2, 1, 32, 32)
    x[:, :, 8:16, 8:16] = 1.0
    masks = (x[:, 0] > 0.5).to(torch.uint8)
    augment = MaskAugment()
    augment.size = (16, 24)
    out, out_masks = augment(x, masks, torch.Generator().manual_seed(0))
    assert out.shape == (2, 1, 16, 24) and out_masks.shape == (2, 16, 24) and out_masks.dtype == torch.uint8
    assert set(out_masks.unique().tolist()) == {0, 1}  # no warp beyond the image: nothing to ignore
    assert torch.equal(out_masks, (out[:, 0] > 0.5).to(torch.uint8))  # the square, halved in height, in both


def test_progressive_resizing_trains_the_teacher_small_first_and_the_students_at_full_size(pipeline, monkeypatch):
    from visionops.tasks.segmentation import segmenter
    from visionops.tasks.segmentation.baseline import student_config
    from visionops.tasks.segmentation.train import recorded_augment, setup
    from visionops.training.progressive import epoch_sides

    assert epoch_sides(0.5, 4, 7, 64, 64) == [(32, 32), (40, 40), (48, 48), (56, 56), None, None, None]
    assert epoch_sides(1.0, 0, 3, 64, 48) == [None] * 3 and epoch_sides(0.5, 2, 3, 64, 48)[:2] == [(32, 24), (48, 40)]
    seen: list[tuple[bool, int]] = []  # (training?, side) of every forward pass
    build = segmenter.build

    def watched_build(*args, **kwargs):
        model = build(*args, **kwargs)
        model.register_forward_pre_hook(lambda m, inputs: seen.append((m.training, inputs[0].shape[-1])))
        return model

    monkeypatch.setattr(segmenter, "build", watched_build)
    root = pipeline["root"]
    p = params(train={"epochs": 3, "progressive_start": 0.5, "progressive_epochs": 2})
    s = setup(pipeline["ds"], root / "prepared", p.train, recorded_augment(root / "prepared"))
    hard = s.hard
    s.fit("unet_small", p.train, lambda logits, masks, _x: hard(logits, masks), None, "x", "teacher", None)
    training = [side for is_training, side in seen if is_training]
    steps = len(training) // 3
    assert steps > 0 and training == [32] * steps + [48] * steps + [64] * steps
    assert {side for is_training, side in seen if not is_training} == {64}  # every val pass at the full size
    assert student_config(p.distill, p.train).progressive_start == 1.0



def test_train_steps_ramps_progressive_resizing_over_the_epochs_it_makes(pipeline, monkeypatch):
    """train.steps two epochs and one step: 3 epochs (32, 48, then 64 px for the last, partial one); two
    epochs' steps leave none at the full size, which is refused naming both keys."""
    from visionops.errors import InvalidInputError
    from visionops.tasks.segmentation import segmenter
    from visionops.tasks.segmentation.train import recorded_augment, setup

    seen: list[int] = []  # the side of every training forward pass
    build = segmenter.build

    def watched_build(*args, **kwargs):
        model = build(*args, **kwargs)
        model.register_forward_pre_hook(lambda m, inputs: seen.append(inputs[0].shape[-1]) if m.training else None)
        return model

    monkeypatch.setattr(segmenter, "build", watched_build)
    root = pipeline["root"]
    s = setup(pipeline["ds"], root / "prepared", params().train, recorded_augment(root / "prepared"))
    per_epoch = -(-len(s.train_data[0]) // 16)
    hard = s.hard
    p = params(train={"steps": 2 * per_epoch + 1, "progressive_start": 0.5, "progressive_epochs": 2})
    _, state = s.fit("unet_small", p.train, lambda logits, masks, _x: hard(logits, masks), None, "x", "teacher", None)
    assert seen == [32] * per_epoch + [48] * per_epoch + [64] and (state.epoch, state.steps) == (3, 2 * per_epoch + 1)
    p = params(train={"steps": 2 * per_epoch, "progressive_start": 0.5, "progressive_epochs": 2})
    with pytest.raises(InvalidInputError, match=r"train.progressive_epochs \(2\) must be below the 2 epochs train.steps"):
        s.fit("unet_small", p.train, lambda logits, masks, _x: hard(logits, masks), None, "x", "teacher", None)


def test_baseline_and_distill_report_teacher_vs_student(pipeline):
    root = pipeline["root"]
    base = json.loads((root / "reports/baseline/baseline.json").read_text())
    assert base["student"] == "unet_small" and not base["skipped"]
    d = json.loads((root / "reports/distill/details.json").read_text())
    assert d["student_parameters"] < d["teacher_parameters"] and d["onnx_parity"]
    assert d["kd_gain"] == pytest.approx(d["student_miou"] - base["test_miou"])
    assert (root / "reports/distill/student.onnx").exists() and (root / "student.pt").exists()
    assert pipeline["params"].distill.quantize and (root / "reports/distill/student.int8.onnx").exists()
    assert d["int8_method"] == "static_qdq_per_channel" and d["int8_bytes"] < d["onnx_bytes"]
    assert d["int8_pixel_agreement_with_fp32"] > 0.9 and 0 <= d["int8_miou"] <= 1
    assert abs(d["int8_miou_drop"] - (d["fp32_onnx_miou"] - d["int8_miou"])) < 1e-12
    assert "int8_speedup" not in d and "int8 (static" in (root / "reports/distill/report.md").read_text()


def test_with_init_teacher_both_students_start_from_the_teachers_channels(pipeline, tmp_path, monkeypatch):
    from visionops.tasks.segmentation import segmenter
    from visionops.tasks.segmentation import train as train_module

    root, task = pipeline["root"], get_task("segmentation")
    teacher_net = segmenter.load(root / "teacher.pt")[0].net.state_dict()
    started: list[str] = []

    def spy(wide, narrow):
        assert all(torch.equal(v, teacher_net[k]) for k, v in wide.state_dict().items())
        narrow_into(wide, narrow)
        started.append(type(narrow).__name__ + str(sum(p.numel() for p in narrow.parameters())))

    monkeypatch.setattr(train_module, "narrow_into", spy)
    p = params(distill={"init": "teacher"})
    for name in ("baseline", "distill"):
        (tmp_path / name).mkdir()
    base = task.baseline(p, pipeline["ds"], root / "prepared", root / "teacher.pt", tmp_path / "baseline", tmp_path)
    d = task.distill(p, pipeline["ds"], root / "prepared", root / "teacher.pt", tmp_path / "student.pt", tmp_path / "distill",
                     tmp_path, tmp_path / "baseline/baseline.json")
    assert started == ["UNet100990", "UNet100990"]  # unet_small, in both stages
    assert base["init"] == d["init"] == "teacher" and d["kd_gain"] == pytest.approx(d["student_miou"] - base["test_miou"])
    assert "started from the teacher's strongest channels" in (tmp_path / "distill/report.md").read_text()
    assert json.loads((root / "reports/baseline/baseline.json").read_text())["init"] == "scratch"  # the fixture's


def test_pyfunc_returns_a_mask_at_the_input_size(pipeline):
    from visionops.serving.pyfunc import encode_png
    from visionops.tasks.segmentation.serving import SegmenterModel, decode_mask

    import pandas as pd

    model = SegmenterModel().load(pipeline["root"] / "teacher.pt")
    img = np.asarray(dataset.load(pipeline["ds"]).splits["test"].images[0])
    big = np.repeat(np.repeat(img, 2, 0), 2, 1)  # 128 x 128
    out = model.predict(None, pd.DataFrame({"image": [encode_png(big), "not an image"]}))
    mask = decode_mask(out["mask"][0])
    assert mask.shape == (128, 128) and mask.max() < 11 and out["error"][0] == ""
    assert set(out["classes"][0].split()) == {CLASS_NAMES[c] for c in np.unique(mask)}
    assert out["mask"][1] is None and "cannot decode" in out["error"][1]


def test_log_model_and_score_the_served_model(pipeline, store):
    import mlflow

    task, root = get_task("segmentation"), pipeline["root"]
    with mlflow.start_run():
        version = task.log_model(root / "teacher.pt", "visionops-segmenter", {"stage": "test"}, "challenger")
    assert str(version.version) == "1"
    ds = dataset.load(pipeline["ds"])
    served = mlflow.pyfunc.load_model("models:/visionops-segmenter@challenger").unwrap_python_model()
    scores, correct = task.score_served(served, ds.splits["test"], ds, pipeline["params"].evaluate)
    evaluated = json.loads((root / "reports/evaluate/metrics.json").read_text())
    assert scores["n"] == 12 and len(correct) == 12
    assert scores["miou"] == pytest.approx(evaluated["miou"])  # the served path predicts what evaluate scored
    assert set(scores["per_class_iou"]) <= set(CLASS_NAMES)


def test_prior_correction_undoes_the_class_weights_as_far_as_val_miou_gains():
    from visionops.config import TrainConfig
    from visionops.tasks.segmentation.objective import fit_prior_correction
    from visionops.tasks.segmentation.segmenter import build

    torch.manual_seed(0)
    model = build("unet_small", ["background", "a"], (8, 8, 1), [0.5], [0.25])
    with torch.no_grad():  # a network that paints class "a" a little too often: bias 1.0 towards it
        model.net.head.bias.copy_(torch.tensor([0.0, 1.0]))
    x = torch.zeros(4, 1, 8, 8, dtype=torch.uint8)
    masks = torch.zeros(4, 8, 8, dtype=torch.uint8)  # all background
    cfg, cpu = TrainConfig(eval_batch_size=2, device="cpu"), torch.device("cpu")
    strength = fit_prior_correction(model, x, masks, [0.1, 1.0], cfg, cpu)  # log(0.1) = -2.3 on background
    assert strength > 0 and model.logit_bias[0, 0, 0, 0] == pytest.approx(-strength * np.log(0.1))
    assert (model(x).argmax(1) == 0).all()  # with the correction every pixel is background again
    assert fit_prior_correction(model, x, masks, [1.0, 1.0], cfg, cpu) == 0.0  # no weights: nothing to undo
    assert torch.equal(model.logit_bias, torch.zeros_like(model.logit_bias))
    fit_prior_correction(model, x, masks, [0.1, 1.0], cfg, cpu)
    assert fit_prior_correction(model, x, masks, None, cfg, cpu) == 0.0  # balance.strategy none: an unweighted loss
    assert torch.equal(model.logit_bias, torch.zeros_like(model.logit_bias))
