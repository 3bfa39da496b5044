"""The evaluate stage: metrics, calibration, Grad-CAM, figures and the end-to-end report."""

from __future__ import annotations

import csv
import json
import re

import numpy as np
import pytest
import torch
from sklearn import metrics as skm

from visionops.config import EvaluateConfig, PromoteConfig
from visionops.data import dataset
from visionops.evaluation import calibration, membership
from visionops.model_names import NO_CONV
from visionops.models import list_models
from visionops.tasks.classification import classifier, explain
from visionops.tasks.classification.evaluate import (
    HEADLINE,
    OUTPUTS,
    EvaluationError,
    run_evaluate,
)
from visionops.tasks.classification.metrics import (
    classification_metrics,
    confusion,
    top_k_accuracy,
)

NAMES = ["bar_top", "bar_middle", "bar_bottom"]


# ------------------------------------------------------------------------------------------
# metrics


def _scores_for(pred: list[int], n_classes: int, second: list[int] | None = None) -> np.ndarray:
    """Scores whose argmax is `pred` (and, optionally, whose second choice is `second`)."""
    s = np.zeros((len(pred), n_classes))
    s[np.arange(len(pred)), pred] = 3.0
    if second is not None:
        s[np.arange(len(pred)), second] = 2.0
    return s


def test_classification_metrics_hand_computed():
    y = [0, 0, 1, 1, 2, 2]
    pred = [0, 1, 1, 1, 2, 0]
    m = classification_metrics(y, _scores_for(pred, 3), NAMES, top_k=1)
    assert m["n"] == 6
    assert m["accuracy"] == pytest.approx(4 / 6)
    assert m["balanced_accuracy"] == pytest.approx((0.5 + 1.0 + 0.5) / 3)
    f1 = [0.5, 2 * (2 / 3) / (2 / 3 + 1), 2 * 0.5 / 1.5]
    assert m["macro_f1"] == pytest.approx(np.mean(f1))
    assert m["top_k"] == 1 and m["top_k_accuracy"] == pytest.approx(4 / 6)
    pc = m["per_class"]
    assert list(pc) == NAMES
    assert pc["bar_top"] == pytest.approx({"precision": 0.5, "recall": 0.5, "f1": 0.5, "support": 2, "accuracy": 0.5})
    assert pc["bar_middle"]["precision"] == pytest.approx(2 / 3) and pc["bar_middle"]["accuracy"] == 1.0
    assert pc["bar_bottom"] == pytest.approx(
        {"precision": 1.0, "recall": 0.5, "f1": 2 / 3, "support": 2, "accuracy": 0.5}
    )
    np.testing.assert_array_equal(confusion(y, pred, 3), [[1, 1, 0], [0, 2, 0], [1, 0, 1]])


def test_classification_metrics_agree_with_sklearn_and_absent_class():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 4, 200)
    y[y == 3] = 0  # class 3 has no samples
    scores = rng.normal(size=(200, 4)) + 2 * np.eye(4)[y]
    m = classification_metrics(torch.from_numpy(y), torch.from_numpy(scores), list("abcd"), top_k=2)
    pred = scores.argmax(1)
    assert m["accuracy"] == pytest.approx(skm.accuracy_score(y, pred))
    assert m["macro_f1"] == pytest.approx(skm.f1_score(y, pred, labels=range(4), average="macro", zero_division=0))
    assert m["top_k_accuracy"] == pytest.approx(skm.top_k_accuracy_score(y, scores, k=2, labels=range(4)))
    assert m["per_class"]["d"]["support"] == 0 and m["per_class"]["d"]["accuracy"] is None


def test_top_k():
    y = [0, 1, 2, 0]
    scores = _scores_for([1, 1, 0, 2], 4, second=[0, 2, 2, 1])  # top-1 right once; top-2 right three times
    assert top_k_accuracy(y, scores, 1) == (1, 0.25)
    assert top_k_accuracy(y, scores, 2) == (2, 0.75)
    assert top_k_accuracy(y, scores, 4) == (4, 1.0)
    assert top_k_accuracy(y, scores, 10) == (4, 1.0)  # k capped at n_classes: perfect, no warning
    assert classification_metrics(y, scores, list("abcd"), top_k=5)["top_k"] == 4
    # binary: k = 1 is plain accuracy
    assert top_k_accuracy([0, 1, 1], _scores_for([0, 0, 1], 2), 1) == (1, pytest.approx(2 / 3))


# ------------------------------------------------------------------------------------------
# calibration


def _two_class_probs(confidence: float, correct: list[bool]) -> tuple[np.ndarray, np.ndarray]:
    probs = np.tile([confidence, 1 - confidence], (len(correct), 1))
    return probs, np.where(correct, 0, 1)


def test_ece_known_cases():
    probs, y = _two_class_probs(0.8, [True] * 8 + [False] * 2)
    assert calibration.expected_calibration_error(probs, y, 15) == pytest.approx(0.0, abs=1e-12)
    probs, y = _two_class_probs(1.0, [True, False] * 5)
    assert calibration.expected_calibration_error(probs, y, 15) == pytest.approx(0.5)
    # two bins: 4 samples at 0.9 all right (gap 0.1), 6 samples at 0.6 with half right (gap 0.1)
    p1, y1 = _two_class_probs(0.9, [True] * 4)
    p2, y2 = _two_class_probs(0.6, [True, False] * 3)
    probs, y = np.concatenate([p1, p2]), np.concatenate([y1, y2])
    assert calibration.expected_calibration_error(probs, y, 10) == pytest.approx(0.4 * 0.1 + 0.6 * 0.1)
    bins = calibration.reliability_bins(probs, y, 10)
    assert bins["count"].sum() == 10 and bins["count"][8] == 4 and bins["count"][5] == 6
    assert bins["accuracy"][8] == 1.0 and bins["confidence"][5] == pytest.approx(0.6)
    assert np.isnan(bins["accuracy"][0])


@pytest.mark.parametrize("k", [0.5, 1.0, 2.5])
def test_fit_temperature_recovers_scale(k):
    rng = np.random.default_rng(1)
    z = rng.normal(scale=2.0, size=(20000, 5))
    p = calibration.probabilities(z)
    labels = (p.cumsum(1) > rng.random((len(z), 1))).argmax(1)  # sampled from softmax(z): calibrated
    t = calibration.fit_temperature(torch.from_numpy(k * z).float(), labels)
    assert t == pytest.approx(k, rel=0.05)
    assert calibration.nll(k * z, labels, t) <= calibration.nll(k * z, labels) + 1e-9
    if k > 1:
        ece_before = calibration.expected_calibration_error(calibration.probabilities(k * z), labels)
        ece_after = calibration.expected_calibration_error(calibration.probabilities(k * z, t), labels)
        assert ece_after < ece_before


def test_fit_temperature_without_data_is_identity():
    assert calibration.fit_temperature(np.zeros((0, 3)), np.zeros(0, np.int64)) == 1.0


# ------------------------------------------------------------------------------------------
# Grad-CAM


@pytest.mark.parametrize("size", [16, 32])
@pytest.mark.parametrize("arch", [m for m in list_models("classification") if m not in NO_CONV])  # NO_CONV: refused by the config
def test_gradcam_every_classifier(arch, size):
    torch.manual_seed(0)
    channels = 1 if size == 16 else 3
    model = classifier.build(arch, NAMES, (size, size, channels), [0.5] * channels, [0.25] * channels).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    images = np.random.default_rng(0).integers(0, 256, (4, size, size, channels), dtype=np.uint8)
    maps = explain.gradcam_maps(model, images, [0, 1, 2, 0])
    assert maps.shape == (4, size, size) and maps.dtype == np.float32
    assert np.isfinite(maps).all() and maps.min() >= 0.0 and maps.max() <= 1.0
    assert maps.max() > 0.5  # a real (not constant) map for at least one image
    assert isinstance(explain.target_layer(model), torch.nn.Conv2d)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # caller's model untouched


def test_greyscale_images_are_drawn_grey(tmp_path):
    plt = explain._pyplot()
    fig, ax = plt.subplots()
    grey = np.full((16, 16, 1), 40, np.uint8)
    explain.show_image(ax, grey)
    im = ax.get_images()[0]
    assert im.get_cmap().name == "gray" and im.get_clim() == (0, 255)
    plt.close(fig)
    rgb = explain.overlay(grey, np.zeros((16, 16), np.float32))
    assert rgb.shape == (16, 16, 3) and rgb.dtype == np.uint8


# ------------------------------------------------------------------------------------------
# the stage, end to end


def _bars(n: int, rng: np.random.Generator, size: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """Noisy greyscale images with a bright horizontal bar in the top, middle or bottom third."""
    labels = np.arange(n) % 3
    images = rng.integers(0, 60, (n, size, size, 1))
    third = size // 3
    for i, c in enumerate(labels):
        images[i, c * third + 1 : c * third + third, 2:-2] += 180
    return images.clip(0, 255).astype(np.uint8), labels.astype(np.int64)


@pytest.fixture(scope="module")
def tiny_dataset(tmp_path_factory):
    rng = np.random.default_rng(0)
    splits = {}
    for name, n in (("train", 60), ("val", 30), ("test", 30)):
        images, labels = _bars(n, rng)
        splits[name] = dataset.Split(images, labels, [f"{name}/{i:03d},x.png" for i in range(n)])
    root = tmp_path_factory.mktemp("data") / "dataset"
    dataset.save(dataset.Dataset(NAMES, splits, "synthetic"), root)
    images, labels = _bars(30, rng)  # the frozen holdout beside it: the membership audit's non-members
    holdout = dataset.Split(images, labels, [f"holdout/{i:03d},x.png" for i in range(30)])
    dataset.save(dataset.Dataset(NAMES, {"holdout": holdout}, "synthetic"), root.parent / "holdout")
    return root


def _model(ds_root, tmp_path, train_steps: int = 0):
    ds = dataset.load(ds_root)
    train = ds.splits["train"]
    mean, std = classifier.channel_stats(train.images)
    torch.manual_seed(0)
    model = classifier.build("lenet", NAMES, ds.image_shape, mean, std)
    if train_steps:
        x = torch.from_numpy(np.array(train.images)).permute(0, 3, 1, 2)
        y = torch.from_numpy(train.labels)
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        model.train()
        for _ in range(train_steps):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
    path = tmp_path / "model.pt"
    classifier.save(path, model.eval(), "lenet", NAMES, ds.image_shape)
    return path


CFG = EvaluateConfig(top_k=2, calibration_bins=10, gradcam_samples=3, gallery_size=5, latency_batch_size=8)


def test_run_evaluate_writes_every_output(tiny_dataset, tmp_path):
    reports = tmp_path / "reports"
    metrics = run_evaluate(tiny_dataset, _model(tiny_dataset, tmp_path), CFG, reports, eval_batch_size=7, device="cpu",
                           holdout_dir=tiny_dataset.parent / "holdout")
    for name in (*OUTPUTS, f"figures/{membership.FIGURE}"):
        assert (reports / name).stat().st_size > 0, name
    assert not list(reports.glob(".*.tmp"))  # no leftovers of the atomic writes
    on_disk = json.loads((reports / "details.json").read_text())
    speeds = json.loads((reports / "measured.json").read_text())  # machine-dependent: not in a file DVC hashes
    assert set(speeds) == {"latency_batch_ms", "latency_single_image_ms", "images_per_second"}
    assert on_disk == pytest.approx({k: v for k, v in metrics.items() if k not in speeds})
    headline = json.loads((reports / "metrics.json").read_text())  # the DVC metrics: a few numbers
    assert set(HEADLINE) == {"accuracy", "balanced_accuracy", "macro_f1", "ece_calibrated", "mia_auc", "mia_tpr_at_1pct_fpr"}
    assert headline == pytest.approx({k: metrics[k] for k in HEADLINE})
    assert on_disk["mia_members"] == on_disk["mia_nonmembers"] == 30  # balanced: 30 of the 60 train images
    for key in ("mia_loss_auc", "mia_lira_auc", "mia_loss_tpr_at_1pct_fpr", "mia_lira_tpr_at_1pct_fpr"):
        assert 0 <= on_disk[key] <= 1, key
    assert speeds == pytest.approx({k: metrics[k] for k in speeds}) and speeds["latency_batch_ms"] > 0
    for key in ("accuracy", "balanced_accuracy", "macro_f1", "top_k_accuracy", "ece", "ece_calibrated",
                "temperature", "nll", "parameters", "model_size_bytes"):  # fmt: skip
        assert isinstance(on_disk[key], (int, float)) and not isinstance(on_disk[key], bool), key
    assert on_disk["test_images"] == 30 and on_disk["top_k"] == 2 and on_disk["temperature"] > 0
    per_class = json.loads((reports / "per_class.json").read_text())
    assert list(per_class) == NAMES and sum(r["support"] for r in per_class.values()) == 30
    with (reports / "predictions.csv").open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0]) == ["path", "actual", "predicted", "confidence"]
    assert len(rows) == 30 and rows[0]["path"] == "test/000,x.png"
    assert {r["actual"] for r in rows} == set(NAMES) and {r["predicted"] for r in rows} <= set(NAMES)
    assert all(1 / 3 - 1e-6 <= float(r["confidence"]) <= 1 for r in rows)
    report = (reports / "report.md").read_text()
    linked = set(re.findall(r"\]\(([^)]+\.png)\)", report))
    assert linked == {n for n in OUTPUTS if n.endswith(".png")} | {f"figures/{membership.FIGURE}"}
    assert "## Membership-inference audit" in report
    assert all((reports / link).exists() for link in linked)
    for name in NAMES:
        assert f"| {name} |" in report
    page = (reports / "report.html").read_text()  # what MLflow's artifact viewer renders: every figure embedded
    assert page.count('src="data:image/png;base64,') == len(linked) and "figures/" not in page
    assert "`dvc plots show` draws the whole matrix from predictions.csv" in report


def test_run_evaluate_trained_model_matches_sklearn(tiny_dataset, tmp_path):
    reports = tmp_path / "reports"
    metrics = run_evaluate(tiny_dataset, _model(tiny_dataset, tmp_path, train_steps=40), CFG, reports, device="cpu")
    assert metrics["accuracy"] > 0.8  # chance is 1/3
    with (reports / "predictions.csv").open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    actual, predicted = [r["actual"] for r in rows], [r["predicted"] for r in rows]
    assert metrics["accuracy"] == pytest.approx(skm.accuracy_score(actual, predicted))
    assert metrics["balanced_accuracy"] == pytest.approx(skm.balanced_accuracy_score(actual, predicted))
    assert metrics["macro_f1"] == pytest.approx(
        skm.f1_score(actual, predicted, labels=NAMES, average="macro", zero_division=0)
    )
    per_class = json.loads((reports / "per_class.json").read_text())
    report = skm.classification_report(actual, predicted, labels=NAMES, output_dict=True, zero_division=0)
    for name in NAMES:
        assert per_class[name]["precision"] == pytest.approx(report[name]["precision"])
        assert per_class[name]["recall"] == pytest.approx(report[name]["recall"])
        assert per_class[name]["support"] == report[name]["support"]
    assert metrics["ece_calibrated"] <= metrics["ece"] + 0.05 or metrics["nll_calibrated"] <= metrics["nll"] + 1e-9
    assert metrics["nll_calibrated"] <= metrics["nll"] + 0.05


def test_run_evaluate_rejects_mismatched_model(tiny_dataset, tmp_path):
    model = classifier.build("lenet", ["x", "y"], (16, 16, 1), [0.5], [0.25])
    path = tmp_path / "other.pt"
    classifier.save(path, model, "lenet", ["x", "y"], (16, 16, 1))
    with pytest.raises(EvaluationError, match="trained on classes"):
        run_evaluate(tiny_dataset, path, CFG, tmp_path / "reports", device="cpu")


@pytest.mark.slow
def test_membership_audit_catches_an_overfitted_model_and_the_gate_refuses_it(tmp_path):
    """A real lenet trained to memorise 30 noise images with random labels tells them from 30 unseen ones."""
    from visionops.serving.promotion import _gates

    rng = np.random.default_rng(5)
    images, labels = rng.integers(0, 256, (60, 16, 16, 1), dtype=np.uint8), np.arange(60) % 3
    root = tmp_path / "dataset"
    splits = {"train": dataset.Split(images[:30], labels[:30], [f"t{i}" for i in range(30)]),
              "test": dataset.Split(images[30:], labels[30:], [f"s{i}" for i in range(30)])}
    dataset.save(dataset.Dataset(NAMES, splits, "synthetic"), root)
    dataset.save(dataset.Dataset(NAMES, {"holdout": splits["test"]}, "synthetic"), tmp_path / "holdout")
    m = run_evaluate(root, _model(root, tmp_path, train_steps=300), CFG, tmp_path / "reports", device="cpu",
                     holdout_dir=tmp_path / "holdout")
    assert m["mia_members"] == m["mia_nonmembers"] == 30
    assert m["mia_loss_auc"] > 0.8 and m["mia_lira_auc"] > 0.7, m
    challenger = {"headline": "accuracy", "per_class_metric": "per_class_recall", "paired": "accuracy",
                  "accuracy": 1.0, "per_class_recall": {"a": 1.0}, "latency_ms": 1.0, "latency_batch_size": 8,
                  "mia_auc": m["mia_auc"]}
    failures, checks = _gates(challenger, None, PromoteConfig(min_score=0.9, min_class_score=0.8, max_membership_auc=0.6))
    assert failures == [f"membership-inference AUC {m['mia_auc']:.4f} vs max_membership_auc 0.6000 (set "
                        "promote.max_membership_auc in params.yaml)"]
