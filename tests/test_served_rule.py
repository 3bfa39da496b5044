"""The served rule (test-time augmentation + temperature) lives in the model file, and evaluate, the
promotion gates and the served pyfunc model all judge that same predictor."""

from __future__ import annotations

import csv

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from mlflow.tracking._model_registry import utils as registry_utils
from mlflow.tracking._tracking_service import utils as tracking_utils

from visionops.config import EvaluateConfig
from visionops.data import dataset
from visionops.evaluation import calibration
from visionops.serving.promotion import evaluate_version
from visionops.serving.pyfunc import encode_png, log_classifier
from visionops.tasks.classification import classifier
from visionops.tasks.classification.evaluate import run_evaluate
from visionops.tasks.classification.train import set_served_rule

NAMES = ["a", "b", "c"]
SHAPE = (16, 16, 1)
CPU = torch.device("cpu")


def _images(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Class k is bright in a k-dependent left/right/bottom region: asymmetric, so mirroring matters."""
    x = rng.integers(0, 60, (len(labels), *SHAPE), dtype=np.uint8)
    for i, k in enumerate(labels):
        region = [(slice(0, 8), slice(0, 5)), (slice(0, 8), slice(11, 16)), (slice(10, 16), slice(3, 13))][k]
        x[i][region] = rng.integers(120, 256, x[i][region].shape, dtype=np.uint8)
    return x


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    rng = np.random.default_rng(0)
    splits = {}
    for name, n in {"train": 150, "val": 60, "test": 60}.items():
        labels = np.arange(n) % 3
        splits[name] = dataset.Split(_images(labels, rng), labels, [f"{name}/{i}.png" for i in range(n)])
    splits["holdout"] = splits["test"]  # the registry judges on the holdout, evaluate on test: the same images here
    root = tmp_path_factory.mktemp("served") / "dataset"
    dataset.save(dataset.Dataset(NAMES, splits, "synthetic"), root)
    return root


@pytest.fixture(scope="module")
def trained(data) -> classifier.Classifier:
    ds = dataset.load(data, mmap=False)
    train = ds.splits["train"]
    mean, std = classifier.channel_stats(train.images)
    torch.manual_seed(0)
    model = classifier.build("lenet", NAMES, SHAPE, mean, std)
    x, y = torch.from_numpy(np.asarray(train.images)).permute(0, 3, 1, 2), torch.from_numpy(train.labels)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(30):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return model.eval()


def test_predict_logits_applies_the_stored_tta_and_temperature(trained, tmp_path):
    images = np.asarray(_images(np.arange(5) % 3, np.random.default_rng(1)))
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
    with torch.no_grad():
        plain, mirrored = trained(x), trained(x.flip(-1))
    trained.tta, trained.temperature = "flip", 2.5
    path = tmp_path / "m.pt"
    classifier.save(path, trained, "lenet", NAMES, SHAPE)
    model, info = classifier.load(path)
    assert (info["tta"], info["temperature"], model.tta, model.temperature) == ("flip", 2.5, "flip", 2.5)
    torch.testing.assert_close(classifier.predict_logits(model, images, CPU), (plain + mirrored) / 2 / 2.5)
    torch.testing.assert_close(classifier.predict_logits(model, images, CPU, calibrated=False), (plain + mirrored) / 2)
    trained.tta, trained.temperature = "none", 1.0


def test_files_without_a_served_rule_load_as_plain_logits(trained, tmp_path):
    path = tmp_path / "old.pt"
    state = {k: v.detach() for k, v in trained.state_dict().items()}
    torch.save({"arch": "lenet", "class_names": NAMES, "image_shape": list(SHAPE), "state_dict": state}, path)
    model, info = classifier.load(path)
    assert (model.tta, model.temperature, info["tta"], info["temperature"]) == ("none", 1.0, "none", 1.0)
    torch.save({"arch": "lenet", "class_names": NAMES, "image_shape": list(SHAPE), "state_dict": state, "tta": "spin"}, path)
    with pytest.raises(ValueError, match="bad served rule"):
        classifier.load(path)


def test_set_served_rule_fits_the_temperature_of_the_served_logits(trained, data):
    ds = dataset.load(data)
    val = ds.splits["val"]
    set_served_rule(trained, "flip_translate", val, CPU, batch_size=16)
    try:
        raw = classifier.predict_logits(trained, val.images, CPU, calibrated=False)
        assert trained.tta == "flip_translate"
        assert trained.temperature == pytest.approx(calibration.fit_temperature(raw, val.labels))
        served = classifier.predict_logits(trained, val.images, CPU)
        assert calibration.nll(served, val.labels) <= calibration.nll(raw, val.labels) + 1e-12
        assert torch.equal(served.argmax(1), raw.argmax(1))  # a temperature never changes the prediction
    finally:
        trained.tta, trained.temperature = "none", 1.0


@pytest.fixture
def store(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_REGISTRY_URI", raising=False)
    monkeypatch.setattr(registry_utils, "_registry_uri", None)
    old = tracking_utils._tracking_uri
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = mlflow.create_experiment("served", artifact_location=(tmp_path / "artifacts").as_uri())
    mlflow.set_experiment(experiment_id=exp)
    yield
    mlflow.end_run()
    mlflow.set_tracking_uri(old)


def test_evaluate_the_gates_and_serving_agree_on_the_served_predictor(store, trained, data, tmp_path):
    """The ECE evaluate reports after scaling is the ECE the promotion gate sees, of the probabilities served."""
    ds = dataset.load(data)
    set_served_rule(trained, "flip", ds.splits["val"], CPU, batch_size=64)
    path = tmp_path / "teacher.pt"
    try:
        classifier.save(path, trained, "lenet", NAMES, SHAPE)
    finally:
        trained.tta, trained.temperature = "none", 1.0
    assert classifier.load(path)[1]["temperature"] != 1.0
    cfg = EvaluateConfig(calibration_bins=10, gradcam_samples=2, gallery_size=2, latency_batch_size=4)
    metrics = run_evaluate(data, path, cfg, tmp_path / "reports", device="cpu")
    assert metrics["tta"] == "flip" and metrics["temperature"] == classifier.load(path)[1]["temperature"]
    assert metrics["ece_calibrated"] != metrics["ece"]  # before and after are both reported

    with mlflow.start_run():
        version = log_classifier(path, "served", tags={}).version
    gate = evaluate_version(f"models:/served/{version}", data, cfg)
    assert gate["ece"] == pytest.approx(metrics["ece_calibrated"], abs=1e-9)
    assert gate["accuracy"] == pytest.approx(metrics["accuracy"])

    test = ds.splits["test"]
    served = mlflow.pyfunc.load_model(f"models:/served/{version}").predict(
        pd.DataFrame({"image": [encode_png(im) for im in np.asarray(test.images)]})
    )
    probs = served[[f"prob_{c}" for c in NAMES]].to_numpy(dtype=float)
    assert calibration.expected_calibration_error(probs, test.labels, 10) == pytest.approx(metrics["ece_calibrated"], abs=1e-9)
    with (tmp_path / "reports" / "predictions.csv").open(newline="") as fh:
        confidence = [float(r["confidence"]) for r in csv.DictReader(fh)]
    np.testing.assert_allclose(served["probability"].to_numpy(dtype=float), confidence, atol=1e-6)
