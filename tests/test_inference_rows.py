"""The inference log's rows as the served model writes them, and the reference profile registration stores.

Real tiny models of each task (a lenet trained for a few steps; a seeded untrained CenterNet and U-Net), a real
MLflow SQLite store under tmp_path, the models loaded back through `mlflow.pyfunc.load_model`, and the log read
back from its Parquet files.
"""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from conftest import corner_images, train_quickly
from detection_data import write_detection_dataset
from PIL import Image

from visionops.config import DetectionConfig, MonitorConfig
from visionops.data import dataset
from visionops.data.canvases import make_canvases
from visionops.errors import InvalidInputError
from visionops.models import create_model
from visionops.monitoring import embedding, reference
from visionops.monitoring.inference_log import read_log
from visionops.monitoring.log_schema import COLUMNS
from visionops.monitoring.served_log import LOG_URI_ENV
from visionops.serving.integrity import file_sha256
from visionops.serving.promotion import predict_paths
from visionops.serving.pyfunc import encode_png
from visionops.tasks import get_task
from visionops.tasks.classification import classifier
from visionops.tasks.detection import detector
from visionops.tasks.segmentation import segmenter

CORNERS = ["top_left", "top_right", "bottom"]
DIGITS = [str(d) for d in range(10)]
SEG_CLASSES = ["background", *DIGITS]


def _classification(root: Path) -> tuple[Path, Path]:
    rng = np.random.default_rng(0)
    splits = {}
    for name, n in {"train": 120, "val": 24, "test": 12}.items():
        labels = np.arange(n) % 3
        splits[name] = dataset.Split(corner_images(labels, rng), labels, [f"{name}/{i}.png" for i in range(n)])
    dataset.save(dataset.Dataset(CORNERS, splits, "synthetic"), root / "ds")
    model = train_quickly("lenet", CORNERS, splits["train"], seed=0, steps=40)
    classifier.save(root / "model.pt", model, "lenet", CORNERS, (16, 16, 1))
    return root / "ds", root / "model.pt"


def _detection(root: Path) -> tuple[Path, Path]:
    write_detection_dataset(root / "ds", sizes=(("train", 8), ("val", 10), ("test", 4)))
    torch.manual_seed(0)
    model = detector.build("centernet_tiny", DIGITS, (64, 64, 1), [0.3], [0.2], DetectionConfig(score_threshold=0.0, max_detections=5))
    detector.save(root / "model.pt", model.eval(), "centernet_tiny", DIGITS, (64, 64, 1))
    return root / "ds", root / "model.pt"


def _segmentation(root: Path) -> tuple[Path, Path]:
    c = make_canvases(20, 64, seed=0)
    splits = {k: dataset.Split(c.images[s], np.zeros(len(c.images[s]), np.int64), [f"{k}/{i}.png" for i in range(len(c.images[s]))],
                               targets={"masks": c.masks[s]})
              for k, s in {"train": slice(0, 6), "val": slice(6, 16), "test": slice(16, 20)}.items()}
    dataset.save(dataset.Dataset(SEG_CLASSES, splits, "canvases", task="segmentation"), root / "ds")
    torch.manual_seed(0)
    model = segmenter.build("unet_small", SEG_CLASSES, (64, 64, 1), [0.3], [0.2])
    segmenter.save(root / "model.pt", model.eval(), "unet_small", SEG_CLASSES, (64, 64, 1))
    return root / "ds", root / "model.pt"


BUILDERS = {"classification": _classification, "detection": _detection, "segmentation": _segmentation}


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, tuple[Path, Path]]:
    """(dataset folder, model file) per task."""
    return {task: build(tmp_path_factory.mktemp(task)) for task, build in BUILDERS.items()}


def _register(task: str, ds_dir: Path, model_path: Path, tmp: Path, log_uri: str | None = None, name: str | None = None,
              with_profile: bool = True) -> str:
    """Register `model_path` as version 1 of `name` (default: the task's name) with the reference profile of
    `ds_dir`'s val split; returns the model URI."""
    name = name or f"test-{task}"
    settings = MonitorConfig(log_uri=log_uri, embedding_dim=8).model_dump()
    with mlflow.start_run():
        profile = reference.build(task, model_path, ds_dir, settings, tmp / "profile", name) if with_profile else None
        mv = get_task(task).log_model(model_path, name, {}, None, profile)
    return f"models:/{name}/{mv.version}"


def _val_pngs(ds_dir: Path) -> list[str]:
    return [encode_png(im) for im in np.asarray(dataset.load(ds_dir).splits["val"].images)]


# ------------------------------------------------------------------------------------------
# rows of each task


@pytest.mark.parametrize("task", list(BUILDERS))
def test_served_rows_of_each_task(task, files, store, tmp_path, monkeypatch):
    ds_dir, model_path = files[task]
    uri = _register(task, ds_dir, model_path, tmp_path)
    monkeypatch.setenv(LOG_URI_ENV, str(tmp_path / "log"))
    model = mlflow.pyfunc.load_model(uri)
    pngs = _val_pngs(ds_dir)
    wide = np.repeat(np.asarray(dataset.load(ds_dir).splits["val"].images[0]), 2, axis=1)  # sent at another size
    request = [pngs[0], pngs[1], pngs[0], "bm90IGFuIGltYWdl", encode_png(wide)]
    out = model.predict(pd.DataFrame({"image": request}))
    model.unwrap_python_model().served_log.close()  # writes what a background sink still holds
    rows = read_log(str(tmp_path / "log"))

    assert list(rows.columns) == COLUMNS and len(rows) == len(request)
    assert rows["row"].tolist() == list(range(len(request))) and rows["request_id"].nunique() == 1
    assert set(rows["task"]) == {task} and set(rows["model_name"]) == {f"test-{task}"}
    assert set(rows["model_sha256"]) == {file_sha256(model_path)}
    refused = rows.iloc[3]
    assert refused["error"].startswith("cannot decode image bytes") and refused["error"] == out["error"].iloc[3]
    assert rows.loc[[3], ["width", "brightness", "embedding", "answer_class", "confidence", "latency_ms"]].isna().all(axis=None)
    good = rows.drop(index=3)
    assert (good["error"] == "").all()
    h, w, c = model.unwrap_python_model().image_shape
    assert good[["width", "height", "channels"]].values.tolist() == [[w, h, c]] * 3 + [[2 * w, h, c]]
    assert ((good["brightness"] > 0) & (good["brightness"] < 1) & (good["contrast"] > 0) & (good["blur"] > 0)).all()
    assert (good["latency_ms"] > 0).all()
    k = len(model.unwrap_python_model().class_names)
    for shares in good["answer_shares"]:
        assert len(shares) == k and (abs(sum(shares) - 1) < 1e-4 or (task == "detection" and sum(shares) == 0))
    embeddings = np.stack(good["embedding"].to_numpy())
    assert embeddings.shape == (4, 8) and np.isfinite(embeddings).all()
    np.testing.assert_array_equal(embeddings[0], embeddings[2])  # the same image: the same embedding
    assert not np.array_equal(embeddings[0], embeddings[1])
    if task == "classification":
        assert good["answer_class"].tolist() == out["label"].drop(index=3).tolist()
        np.testing.assert_allclose(good["confidence"].astype(float), out["probability"].drop(index=3).astype(float), rtol=1e-6)
        assert (good["answer_count"] == 1).all()
    elif task == "detection":
        answers = [json.loads(d) for d in out["detections"].drop(index=3)]
        assert good["answer_count"].tolist() == [len(a["labels"]) for a in answers]
        for row, a in zip(good.itertuples(), answers):
            assert row.answer_class == a["labels"][int(np.argmax(a["scores"]))]
            assert row.confidence == pytest.approx(np.mean(a["scores"]), abs=1e-4)
    else:
        assert ((good["confidence"] > 1 / k) & (good["confidence"] <= 1)).all()
        for row, classes in zip(good.itertuples(), out["classes"].drop(index=3)):
            assert row.answer_count == len(classes.split())
            assert [SEG_CLASSES[i] for i in np.flatnonzero(np.asarray(row.answer_shares) > 0)] == classes.split()

    # the reference: the val split through the same row-building code, plus each image's score
    ref = reference.load_reference(uri)
    n_val = len(dataset.load(ds_dir).splits["val"])
    assert list(ref.columns) == [*COLUMNS, "score"] and len(ref) == n_val
    assert ref["score"].between(0, 1).all() and (ref["error"] == "").all()
    np.testing.assert_allclose(ref["embedding"].iloc[0], embeddings[0], rtol=1e-4, atol=1e-4)  # served = reference
    np.testing.assert_allclose(ref["brightness"].iloc[0], good["brightness"].iloc[0], rtol=1e-6)
    assert ref["answer_class"].iloc[1] == good["answer_class"].iloc[1]


def test_classification_reference_score_is_correctness(files, store, tmp_path):
    ds_dir, model_path = files["classification"]
    ref = reference.load_reference(_register("classification", ds_dir, model_path, tmp_path))
    labels = [CORNERS[i] for i in dataset.load(ds_dir).splits["val"].labels]
    assert ref["score"].tolist() == [float(a == b) for a, b in zip(ref["answer_class"], labels)]
    assert 0 < ref["score"].mean()


# ------------------------------------------------------------------------------------------
# where the log goes


def _write_pngs(folder: Path, images: np.ndarray) -> list[Path]:
    folder.mkdir()
    paths = []
    for i, im in enumerate(images):
        paths.append(folder / f"{i}.png")
        Image.fromarray(im[..., 0]).save(paths[-1])
    return paths


def test_predict_paths_writes_the_registered_log_location(files, store, tmp_path, monkeypatch, capsys):
    ds_dir, model_path = files["classification"]
    monkeypatch.delenv(LOG_URI_ENV, raising=False)
    uri = _register("classification", ds_dir, model_path, tmp_path, log_uri=str(tmp_path / "registered-log"))
    images = np.asarray(dataset.load(ds_dir).splits["test"].images)
    _write_pngs(tmp_path / "in", images)
    assert predict_paths(uri, [tmp_path / "in"], tmp_path / "out.csv") == len(images)
    rows = read_log(str(tmp_path / "registered-log"))
    assert len(rows) == len(images) and (rows["error"] == "").all()
    assert "inference log" not in capsys.readouterr().err  # said only when rows are lost

    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    monkeypatch.setenv(LOG_URI_ENV, str(blocker / "log"))  # the sink fails (no folder in a file): answers unaffected
    assert predict_paths(uri, [tmp_path / "in"], tmp_path / "again.csv") == len(images)
    assert (tmp_path / "again.csv").read_text() == (tmp_path / "out.csv").read_text()
    err = capsys.readouterr().err
    assert f"{len(images)} of {len(images)} rows not written" in err and "the answers are unaffected" in err


@pytest.mark.slow
def test_mlflow_models_serve_writes_the_registered_log(files, store, tmp_path, monkeypatch):
    """A real scoring server logs each row of a request to the registered location, relative to its working dir."""
    import time

    from model_server import model_server, post

    ds_dir, model_path = files["classification"]
    monkeypatch.delenv(LOG_URI_ENV, raising=False)
    name = "served-classifier"
    settings = MonitorConfig(log_uri="served-log", embedding_dim=8, flush_seconds=0.5).model_dump()
    with mlflow.start_run():
        profile = reference.build("classification", model_path, ds_dir, settings, tmp_path / "profile", name)
        get_task("classification").log_model(model_path, name, {}, None, profile)
    pngs = _val_pngs(ds_dir)[:3] + ["bm90IGFuIGltYWdl"]
    with model_server(f"models:/{name}/1", store, tmp_path) as base:
        status, body = post(f"{base}/invocations", {"dataframe_split": {"columns": ["image"], "data": [[p] for p in pngs]}})
        assert status == 200 and [p["error"] == "" for p in body["predictions"]] == [True, True, True, False]
        deadline = time.monotonic() + 60
        while len(rows := read_log(str(tmp_path / "served-log"))) < len(pngs) and time.monotonic() < deadline:
            time.sleep(0.5)
    assert len(rows) == len(pngs) and rows["answer_class"].tolist()[:3] == [p["label"] for p in body["predictions"][:3]]
    assert rows["embedding"].iloc[:3].map(len).tolist() == [8, 8, 8] and rows["error"].iloc[3].startswith("cannot decode")


def test_env_override_empty_switches_the_log_off(files, store, tmp_path, monkeypatch):
    ds_dir, model_path = files["classification"]
    uri = _register("classification", ds_dir, model_path, tmp_path, log_uri=str(tmp_path / "registered-log"))
    monkeypatch.setenv(LOG_URI_ENV, "")
    model = mlflow.pyfunc.load_model(uri)
    model.predict(pd.DataFrame({"image": _val_pngs(ds_dir)[:3]}))
    assert model.unwrap_python_model().served_log is None and not (tmp_path / "registered-log").exists()


def test_model_without_monitor_metadata_logs_only_with_the_env(files, store, tmp_path, monkeypatch):
    ds_dir, model_path = files["classification"]
    uri = _register("classification", ds_dir, model_path, tmp_path, with_profile=False)
    monkeypatch.delenv(LOG_URI_ENV, raising=False)
    assert mlflow.pyfunc.load_model(uri).unwrap_python_model().served_log is None
    monkeypatch.setenv(LOG_URI_ENV, str(tmp_path / "log"))
    model = mlflow.pyfunc.load_model(uri)
    model.predict(pd.DataFrame({"image": _val_pngs(ds_dir)[:2]}))
    model.unwrap_python_model().served_log.close()
    rows = read_log(str(tmp_path / "log"))
    assert len(rows) == 2 and rows["embedding"].isna().all() and rows["answer_class"].notna().all()


def test_failing_log_never_changes_the_answer(files, store, tmp_path, monkeypatch):
    ds_dir, model_path = files["classification"]
    uri = _register("classification", ds_dir, model_path, tmp_path)
    request = pd.DataFrame({"image": [*_val_pngs(ds_dir)[:4], "bm90IGFuIGltYWdl"]})
    monkeypatch.setenv(LOG_URI_ENV, "")
    expected = mlflow.pyfunc.load_model(uri).predict(request)

    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    monkeypatch.setenv(LOG_URI_ENV, str(blocker / "log"))  # the sink fails: a folder cannot be made in a file
    model = mlflow.pyfunc.load_model(uri)
    pd.testing.assert_frame_equal(model.predict(request), expected)
    log = model.unwrap_python_model().served_log
    log.close()  # a background sink has written (or failed) by then
    assert log.stats["write_errors"] >= 1 and log.stats["rows_dropped"] == 5 and log.stats["rows_written"] == 0

    monkeypatch.setenv(LOG_URI_ENV, str(tmp_path / "log"))  # building the rows fails
    model = mlflow.pyfunc.load_model(uri)
    monkeypatch.setattr("visionops.monitoring.summaries.image_summary", lambda images: 1 / 0)
    pd.testing.assert_frame_equal(model.predict(request), expected)
    stats = model.unwrap_python_model().served_log.stats
    assert stats["failed_rows"] == 5 and "ZeroDivisionError" in stats["last_build_error"]


# ------------------------------------------------------------------------------------------
# the embedding


def test_tta_embedding_is_the_unflipped_pass(files, tmp_path):
    ds_dir, model_path = files["classification"]
    model, _ = classifier.load(model_path)
    model.tta = "flip_translate"
    classifier.save(tmp_path / "tta.pt", model, "lenet", CORNERS, (16, 16, 1))
    images = np.asarray(dataset.load(ds_dir).splits["val"].images)
    served = reference.served_model("classification", tmp_path / "tta.pt")
    capture = embedding.feature_capture(served.model.net, "lenet")
    with capture.capture() as seen:
        served.predict_canonical(images)
    assert len(seen) == 6  # one batch, six passes
    plain = embedding.feature_capture(model.net, "lenet")
    with plain.capture() as direct, torch.no_grad():
        model(torch.from_numpy(images.copy()).permute(0, 3, 1, 2))
    np.testing.assert_allclose(embedding.first_passes(seen, 6), direct[0].numpy(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("arch", ["lenet", "resnet20", "fastnet_tiny", "scatternet", "unet", "unet_small", "centernet",
                                  "centernet_tiny", "fasterrcnn_mobilenet_v3_large_320_fpn", "ssdlite320_mobilenet_v3_large",
                                  "lraspp_mobilenet_v3_large", "deeplabv3_mobilenet_v3_large"])
def test_every_preset_arch_gives_pooled_features_in_its_forward(arch):
    torch.manual_seed(0)
    net = create_model(arch, in_channels=1, num_classes=3, image_size=32).eval()
    capture = embedding.feature_capture(net, arch)
    with capture.capture() as seen, torch.no_grad():
        net(torch.rand(2, 1, 32, 32))
    assert len(seen) == 1 and seen[0].ndim == 2 and seen[0].shape[0] == 2 and seen[0].shape[1] >= 8, arch
    assert not torch.equal(seen[0][0], seen[0][1])


def test_an_arch_without_features_is_named():
    with pytest.raises(InvalidInputError, match="'headless'"):
        embedding.feature_module(torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3)), "headless")


def test_projection_is_a_pca_fewer_dims_when_the_features_have_fewer(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(50, 5)) @ np.diag([5, 3, 1, 0.5, 0.1])
    p = embedding.fit_projection(x, 32)
    assert p.components.shape == (5, 5)
    np.testing.assert_allclose(p.components.T @ p.components, np.eye(5), atol=1e-5)
    z = p(x)
    assert np.all(np.diff(z.var(0)) < 0)  # ordered by variance
    np.testing.assert_allclose(embedding.fit_projection(x, 2).components, p.components[:, :2], atol=1e-6)
    p.save(tmp_path / "p.npz")
    np.testing.assert_array_equal(embedding.Projection.load(tmp_path / "p.npz")(x), z)


def test_image_summary_brightness_contrast_blur():
    from visionops.monitoring.summaries import image_summary

    flat = np.full((16, 16, 3), 51, np.uint8)
    checks = np.indices((16, 16)).sum(0) % 2 * 255
    sharp = np.repeat(checks[..., None], 3, -1).astype(np.uint8)
    soft = np.asarray(Image.fromarray(sharp).resize((8, 8)).resize((16, 16), Image.BILINEAR))
    s = image_summary(np.stack([flat, sharp, soft]))
    np.testing.assert_allclose(s["brightness"], [0.2, 0.5, soft.mean() / 255], rtol=1e-5)
    np.testing.assert_allclose(s["contrast"], [0, 0.5, soft.std() / 255], rtol=1e-4, atol=1e-6)
    assert s["blur"][0] == pytest.approx(0, abs=1e-9) and s["blur"][1] > 10 * s["blur"][2]


def test_a_log_that_cannot_open_never_stops_serving(files, store, tmp_path, monkeypatch, capsys):
    ds_dir, model_path = files["classification"]
    uri = _register("classification", ds_dir, model_path, tmp_path, log_uri=str(tmp_path / "log"))

    def unreadable(path):
        raise ValueError("not an npz")

    monkeypatch.setattr(embedding.Projection, "load", unreadable)
    model = mlflow.pyfunc.load_model(uri)
    assert model.unwrap_python_model().served_log is None
    assert f"warning: inference log {str(tmp_path / 'log')!r} is off: ValueError: not an npz" in capsys.readouterr().err
    assert (model.predict(pd.DataFrame({"image": _val_pngs(ds_dir)[:2]}))["error"] == "").all()
