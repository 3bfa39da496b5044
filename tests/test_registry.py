"""The MLflow registry: pyfunc model, metric-gated promotion, rollback, batch prediction, serving.

Everything runs against a real MLflow SQLite store and artifact folder under tmp_path, with tiny
classifiers trained here on an easily separable synthetic dataset.
"""

from __future__ import annotations

import base64
import csv
import io
import json
import re
import struct
import zlib
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from conftest import corner_images, train_quickly
from mlflow.tracking import MlflowClient
from model_server import model_server, post
from PIL import Image, ImageFile

from visionops.data import dataset
from visionops.data.fetch import file_md5
from visionops.serving.integrity import ChangedModelError, file_sha256
from visionops.serving.promotion import (
    PredictionFailed,
    find_version_by_file,
    predict_paths,
)
from visionops.serving.pyfunc import (
    MAX_BATCH_ROWS,
    MAX_IMAGE_PIXELS,
    MAX_REQUEST_BYTES,
    MAX_REQUEST_PIXELS,
    ImageClassifierModel,
    ImageInputError,
    RegistryError,
    RequestError,
    RequestTooLargeError,
    encode_png,
    log_classifier,
)
from visionops.tasks.classification import classifier

CLASSES = ["top_left", "top_right", "bottom"]
SHAPE = (16, 16, 1)
NAME = "test-classifier"


# ------------------------------------------------------------------------------------------
# data and models


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> Path:
    rng = np.random.default_rng(0)
    splits = {}
    for name, n in {"train": 240, "val": 30, "test": 60}.items():
        labels = np.arange(n) % 3
        splits[name] = dataset.Split(corner_images(labels, rng), labels, [f"{name}/{i}.png" for i in range(n)])
    out = tmp_path_factory.mktemp("data") / "prepared"
    dataset.save(dataset.Dataset(CLASSES, splits, "synthetic"), out)
    return out


def _train(ds: dataset.Dataset, seed: int, steps: int) -> classifier.Classifier:
    return train_quickly("lenet", CLASSES, ds.splits["train"], seed, steps)


@pytest.fixture(scope="session")
def models(data_dir, tmp_path_factory) -> dict[str, Path]:
    """good: ~100% accurate; bad: untrained; no_bottom: never predicts `bottom`;
    underconfident: the good model with logits / 100 (same predictions, large ECE)."""
    ds = dataset.load(data_dir, mmap=False)
    out = tmp_path_factory.mktemp("models")
    good = _train(ds, seed=0, steps=80)
    torch.manual_seed(1)
    mean, std = classifier.channel_stats(ds.splits["train"].images)
    variants = {"good": good, "bad": classifier.build("lenet", CLASSES, SHAPE, mean, std).eval()}
    no_bottom = _train(ds, seed=0, steps=80)
    with torch.no_grad():
        no_bottom.net.classifier[-1].bias[2] = -1e4
    variants["no_bottom"] = no_bottom
    under = _train(ds, seed=0, steps=80)
    with torch.no_grad():
        under.net.classifier[-1].weight.mul_(0.01)
        under.net.classifier[-1].bias.mul_(0.01)
    variants["underconfident"] = under
    paths = {}
    for name, model in variants.items():
        paths[name] = out / f"{name}.pt"
        classifier.save(paths[name], model, "lenet", CLASSES, SHAPE)
    return paths


def _accuracy(path: Path, ds: dataset.Dataset) -> float:
    model, _ = classifier.load(path)
    logits = classifier.predict_logits(model, ds.splits["test"].images, torch.device("cpu"))
    return float((logits.argmax(1).numpy() == ds.splits["test"].labels).mean())


def test_fixture_models_behave_as_intended(models, data_dir):
    ds = dataset.load(data_dir)
    assert _accuracy(models["good"], ds) >= 0.95
    assert _accuracy(models["underconfident"], ds) == _accuracy(models["good"], ds)
    assert 0.6 <= _accuracy(models["no_bottom"], ds) <= 0.7
    assert _accuracy(models["bad"], ds) <= 0.7


# ------------------------------------------------------------------------------------------
# a real MLflow store per test


def _log(path: Path, **tags) -> str:
    with mlflow.start_run():
        return str(log_classifier(path, NAME, tags={"source": path.stem, **tags}).version)


def _aliases(client: MlflowClient) -> dict[str, str]:
    return {alias: str(v) for alias, v in client.get_registered_model(NAME).aliases.items()}


# ------------------------------------------------------------------------------------------
# log_classifier


def test_log_classifier_registers_challenger_with_tags(store, models, tmp_path):
    client = MlflowClient()
    with mlflow.start_run() as run:
        mv = log_classifier(models["good"], NAME, tags={"git_sha": "abc123", "stage": "train"})
    assert mv.name == NAME and str(mv.version) == "1"
    assert mv.aliases == ["challenger"]
    md5 = file_md5(models["good"])
    assert mv.tags == {"git_sha": "abc123", "stage": "train", "run_id": run.info.run_id, "visionops.model_md5": md5,
                       "visionops.weights_sha256": file_sha256(models["good"])}
    assert str(find_version_by_file(NAME, models["good"]).version) == "1"
    assert find_version_by_file(NAME, models["bad"]) is None
    assert str(client.get_model_version_by_alias(NAME, "challenger").version) == "1"
    assert mv.run_id == run.info.run_id
    # the logged model is self-contained: the .pt, the visionops source, pinned requirements
    local = Path(mlflow.artifacts.download_artifacts("models:/test-classifier/1", dst_path=str(tmp_path / "dl")))
    assert (local / "code" / "visionops" / "serving" / "pyfunc.py").exists()
    assert not list((local / "code").rglob("__pycache__"))
    reqs = (local / "requirements.txt").read_text().split()
    names = {r.split("==")[0] for r in reqs}
    assert names == {"mlflow", "torch", "torchvision", "pillow", "numpy", "pandas"}
    assert f"mlflow=={mlflow.__version__}" in reqs and all("+" not in r for r in reqs)
    info = mlflow.models.get_model_info("models:/test-classifier@challenger")
    assert [c["name"] for c in info.signature.inputs.to_dict()] == ["image"]
    assert [c["name"] for c in info.signature.outputs.to_dict()] == [
        "label", "label_index", "probability", *(f"prob_{c}" for c in CLASSES), "error"
    ]
    # logged as code (models-from-code): no pickled python model in the artifact
    conf = mlflow.models.Model.load(str(local)).flavors["python_function"]
    assert conf["model_code_path"].endswith("served_model.py") and not list(local.rglob("*.pkl"))
    example = json.loads((local / "input_example.json").read_text())
    assert example["columns"] == ["image"]
    png = Image.open(io.BytesIO(base64.b64decode(example["data"][0][0])))
    assert png.format == "PNG" and png.size == (16, 16)
    # a second version takes over the challenger alias
    with mlflow.start_run():
        mv2 = log_classifier(models["bad"], NAME, tags={})
    assert str(mv2.version) == "2" and _aliases(client) == {"challenger": "2"}


def test_log_classifier_needs_an_active_run(store, models):
    with pytest.raises(RegistryError, match="active MLflow run"):
        log_classifier(models["good"], NAME, tags={})


# ------------------------------------------------------------------------------------------
# pyfunc predictions and batch prediction


def _png_b64(img: np.ndarray) -> str:
    return encode_png(img)


def test_pyfunc_predict_base64_and_arrays_agree_with_classifier(store, models, data_dir):
    _log(models["good"])
    ds = dataset.load(data_dir)
    images = np.asarray(ds.splits["test"].images[:12])
    net, _ = classifier.load(models["good"])
    logits = classifier.predict_logits(net, images, torch.device("cpu"))
    expected = torch.softmax(logits.double(), 1).numpy()

    pm = mlflow.pyfunc.load_model(f"models:/{NAME}@challenger")
    out = pm.predict(pd.DataFrame({"image": [_png_b64(im) for im in images]}))
    assert list(out.columns) == ["label", "label_index", "probability", *(f"prob_{c}" for c in CLASSES), "error"]
    assert list(out["error"]) == [""] * 12
    np.testing.assert_array_equal(out["label_index"], expected.argmax(1))
    assert list(out["label"]) == [CLASSES[i] for i in expected.argmax(1)]
    np.testing.assert_allclose(out[[f"prob_{c}" for c in CLASSES]].to_numpy(), expected, atol=1e-6)
    np.testing.assert_allclose(out["probability"], expected.max(1), atol=1e-6)

    raw = pm.unwrap_python_model()
    assert isinstance(raw, ImageClassifierModel)
    frames = (
        pd.DataFrame({"image": list(images)}),  # a column of uint8 arrays
        pd.DataFrame({"image": [im.tolist() for im in images]}),  # nested lists (JSON-like)
        pd.DataFrame({"image": [base64.b64decode(_png_b64(im)) for im in images]}),  # raw PNG bytes
    )
    # DataFrames pass the pyfunc wrapper's signature check; a bare N x H x W x C array only the model itself
    for got in [pm.predict(f) for f in frames] + [raw.predict(None, images)]:
        np.testing.assert_array_equal(got["label_index"], out["label_index"])
        np.testing.assert_allclose(got["probability"], out["probability"], atol=1e-12)


def test_pyfunc_canonicalises_any_size_and_colour(store, models, data_dir):
    _log(models["good"])
    raw = mlflow.pyfunc.load_model(f"models:/{NAME}@challenger").unwrap_python_model()
    ds = dataset.load(data_dir)
    images = np.asarray(ds.splits["test"].images[:9])
    labels = ds.splits["test"].labels[:9]
    big_rgb = [np.repeat(np.kron(im, np.ones((4, 4, 1), np.uint8)), 3, axis=2) for im in images]  # 64x64 RGB
    jpeg = []
    for im in big_rgb:
        buf = io.BytesIO()
        Image.fromarray(im).save(buf, format="JPEG", quality=95)
        jpeg.append(base64.b64encode(buf.getvalue()).decode())
    for column in (big_rgb, jpeg, ["data:image/jpeg;base64," + j for j in jpeg]):
        got = raw.predict(None, pd.DataFrame({"image": column}))
        np.testing.assert_array_equal(got["label_index"], labels)


def test_pyfunc_answers_each_row_on_its_own(store, models, data_dir):
    _log(models["good"])
    pm = mlflow.pyfunc.load_model(f"models:/{NAME}@challenger")
    raw = pm.unwrap_python_model()
    ds = dataset.load(data_dir)
    images, labels = np.asarray(ds.splits["test"].images[:3]), ds.splits["test"].labels[:3]
    good = [_png_b64(im) for im in images]
    bad = {
        1: ("%%% not an image", r"^string is not base64-encoded image data$"),
        3: (base64.b64encode(b"GIF89a nope").decode(), r"^cannot decode image bytes: not a PNG/JPEG image"),
        5: (base64.b64encode(b"\x89PNG\r\n\x1a\n truncated").decode(), r"^cannot decode image bytes: "),
    }
    column = [good[0], bad[1][0], good[1], bad[3][0], good[2], bad[5][0]]
    for out in (raw.predict(None, pd.DataFrame({"image": column})), pm.predict(pd.DataFrame({"image": column}))):
        assert list(out.columns)[-1] == "error" and len(out) == 6
        for i, (_, pattern) in bad.items():
            assert re.search(pattern, out["error"][i]) and "\n" not in out["error"][i]
            assert out["label"][i] is None and out["probability"][i] is None
        assert list(out["error"][[0, 2, 4]]) == ["", "", ""]
        assert list(out["label"][[0, 2, 4]]) == [CLASSES[k] for k in labels]
        assert list(out["label_index"][[0, 2, 4]]) == list(labels)
    arrays = raw.predict(None, pd.DataFrame({"image": [np.full((4, 4), 300), np.zeros((4, 4, 2), np.uint8), images[0]]}))
    assert re.match(r"pixel values must be whole numbers in 0\.\.255", arrays["error"][0])
    assert re.match(r"array of shape \(4, 4, 2\) is not an image", arrays["error"][1])
    assert arrays["error"][2] == "" and arrays["label"][2] == CLASSES[labels[0]]
    every_row_bad = raw.predict(None, pd.DataFrame({"image": ["%%%", "%%%"]}))
    assert every_row_bad["error"].str.startswith("string is not base64").all()


def test_pyfunc_whole_request_errors(store, models):
    _log(models["good"])
    pm = mlflow.pyfunc.load_model(f"models:/{NAME}@challenger")
    good = _png_b64(np.zeros(SHAPE, np.uint8))
    with pytest.raises(ImageInputError, match="expected a column 'image'"):
        pm.unwrap_python_model().predict(None, pd.DataFrame({"a": [good], "b": [good]}))
    with pytest.raises(RequestError, match=f"{MAX_BATCH_ROWS + 1} rows in one request; the limit is {MAX_BATCH_ROWS}") as exc:
        pm.predict(pd.DataFrame({"image": [good] * (MAX_BATCH_ROWS + 1)}))
    assert exc.value.get_http_status_code() == 400 and "stack_trace" not in exc.value.serialize_as_json()
    assert len(pm.predict(pd.DataFrame({"image": [good] * MAX_BATCH_ROWS}))) == MAX_BATCH_ROWS


def test_a_too_large_request_is_answered_with_its_reason_alone(store, models):
    """The scoring server's own request path: its 400 used to carry a 15-line repr of the 1,500-row input
    ("Failed to predict data '...'") before the reason."""
    from mlflow.pyfunc.scoring_server import invocations

    _log(models["good"])
    pm = mlflow.pyfunc.load_model(f"models:/{NAME}@challenger")
    good = _png_b64(np.zeros(SHAPE, np.uint8))
    body = json.dumps({"dataframe_split": {"columns": ["image"], "data": [[good]] * 1500}})
    with pytest.raises(RequestError) as exc:
        invocations(body, "application/json", pm, pm.metadata.get_input_schema())
    answer = json.loads(exc.value.serialize_as_json())
    assert answer == {"error_code": "INVALID_PARAMETER_VALUE", "error_class": answer.get("error_class"),
                      **({"sqlstate": answer["sqlstate"]} if "sqlstate" in answer else {}),
                      "message": f"1500 rows in one request; the limit is {MAX_BATCH_ROWS}: split the batch"}
    assert exc.value.get_http_status_code() == 400


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _huge_png(side: int) -> bytes:
    """A valid greyscale PNG of side x side black pixels (~170 KB for 13000), built row by row."""
    z = zlib.compressobj(9)
    row = bytes(side + 1)  # filter byte 0 + pixels
    idat = b"".join(z.compress(row) for _ in range(side)) + z.flush()
    ihdr = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b"")


def test_pyfunc_refuses_huge_images_from_the_header(store, models, monkeypatch):
    _log(models["good"])
    raw = mlflow.pyfunc.load_model(f"models:/{NAME}@challenger").unwrap_python_model()
    huge = _huge_png(13000)
    assert Image.open(io.BytesIO(huge)).size == (13000, 13000)  # a real image
    decoded = []
    load = ImageFile.ImageFile.load
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: decoded.append(self.size) or load(self))
    ok = _png_b64(np.zeros((64, 64), np.uint8))
    out = raw.predict(None, pd.DataFrame({"image": [base64.b64encode(huge).decode(), ok]}))
    assert out["error"][0] == f"image of 13000x13000 pixels is over the limit of {MAX_IMAGE_PIXELS} (4096x4096)"
    assert out["error"][1] == "" and (64, 64) in decoded and (13000, 13000) not in decoded  # never decoded
    too_big = np.zeros((4097, 4096), np.uint8)  # arrays obey the same limit
    assert "over the limit" in raw.predict(None, pd.DataFrame({"image": [too_big]}))["error"][0]


def test_pyfunc_refuses_a_request_over_the_pixel_budget_from_the_headers(store, models, monkeypatch):
    _log(models["good"])
    pm = mlflow.pyfunc.load_model(f"models:/{NAME}@challenger")
    full = base64.b64encode(_huge_png(4096)).decode()  # 4096x4096: each row alone is within the per-image limit
    rows = MAX_REQUEST_PIXELS // MAX_IMAGE_PIXELS + 1
    decoded = []
    load = ImageFile.ImageFile.load
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: decoded.append(self.size) or load(self))
    with pytest.raises(RequestTooLargeError) as exc:
        pm.predict(pd.DataFrame({"image": [full] * rows}))
    assert str(exc.value) == (f"{rows * 4096 * 4096} pixels in one request's images; the limit is {MAX_REQUEST_PIXELS} "
                              f"(16 images of 4096x4096): split the batch")
    assert exc.value.get_http_status_code() == 413 and decoded == []  # refused from the headers: nothing decoded
    huge = base64.b64encode(_huge_png(13000)).decode()  # refused on its own row, from its header: costs no budget
    out = pm.predict(pd.DataFrame({"image": [huge] + [_png_b64(np.zeros(SHAPE, np.uint8))] * (MAX_BATCH_ROWS - 1)}))
    assert out["error"][0].startswith("image of 13000x13000 pixels") and (out["error"][1:] == "").all()
    with pytest.raises(RequestTooLargeError, match=rf"^{MAX_REQUEST_BYTES + 1} bytes of encoded images in one request; "
                       rf"the limit is {MAX_REQUEST_BYTES}: split the batch$"):
        pm.predict(pd.DataFrame({"image": ["A" * (MAX_REQUEST_BYTES // 2), "A" * (MAX_REQUEST_BYTES // 2 + 1)]}))
    assert (13000, 13000) not in decoded


def _stored_weights(store_dir: Path, name: str = "good.pt") -> Path:
    """The weights file `name` of the one logged model holding it in the artifact store (the mlartifacts folder)."""
    (found,) = (store_dir / "artifacts").rglob(name)
    return found


def test_a_changed_weights_file_is_refused_on_load(store, models, tmp_path, capsys, monkeypatch):
    from visionops.cli import main

    with mlflow.start_run():  # as the register stage: two models of one run, each checked against its own version
        log_classifier(models["good"], NAME, tags={})
        log_classifier(models["bad"], f"{NAME}-student", tags={})
    client = MlflowClient()
    recorded = client.get_model_version(NAME, "1").tags["visionops.weights_sha256"]
    assert recorded == file_sha256(models["good"])
    mlflow.pyfunc.load_model(f"models:/{NAME}/1")  # unchanged: both load
    mlflow.pyfunc.load_model(f"models:/{NAME}-student/1")
    stored = _stored_weights(tmp_path)
    stored.write_bytes(models["bad"].read_bytes())  # a valid model, other weights, in the bucket under the same name
    changed = file_sha256(models["bad"])
    with pytest.raises(ChangedModelError) as exc:
        mlflow.pyfunc.load_model(f"models:/{NAME}/1")
    assert re.fullmatch(rf".*/{stored.name}: SHA-256 {changed} differs from {recorded} recorded at registration "
                        rf"\(registry tag visionops.weights_sha256 of {NAME} v1\): the weights were changed after "
                        "registration; refusing to load them", str(exc.value)), str(exc.value)
    # the digest logged beside the weights can be changed too; the registry tag still refuses
    mlmodel = stored.parents[1] / "MLmodel"
    assert recorded in mlmodel.read_text()
    mlmodel.write_text(mlmodel.read_text().replace(recorded, changed))
    with pytest.raises(ChangedModelError, match=f"differs from {recorded} .*registry tag"):
        mlflow.pyfunc.load_model(f"models:/{NAME}/1")
    # `visionops predict` says it in one line
    image = tmp_path / "one.png"
    image.write_bytes(base64.b64decode(_png_b64(np.zeros(SHAPE, np.uint8))))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    (tmp_path / "params.yaml").write_text("task: classification\n")
    assert main(["predict", str(image), "--model", f"models:/{NAME}/1", "--params", str(tmp_path / "params.yaml"),
                 "--out", str(tmp_path / "p.csv")]) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(f"visionops predict: error: {stored}: SHA-256 {changed} differs from {recorded}"), err
    assert not (tmp_path / "p.csv").exists()


def test_without_the_registry_the_logged_digest_is_the_reference(store, models, tmp_path, empty_db):
    import shutil

    _log(models["good"])
    copy = Path(mlflow.artifacts.download_artifacts(f"models:/{NAME}/1", dst_path=str(tmp_path / "copy")))
    other = tmp_path / "other.db"  # a registry that never saw this model
    shutil.copy(empty_db, other)
    mlflow.set_tracking_uri(f"sqlite:///{other}")
    mlflow.pyfunc.load_model(str(copy))  # unchanged: loads
    (weights,) = copy.rglob("*.pt")
    weights.write_bytes(weights.read_bytes()[:-1] + bytes([weights.read_bytes()[-1] ^ 1]))  # one bit
    with pytest.raises(ChangedModelError, match=rf"{weights}: SHA-256 [0-9a-f]{{64}} differs from "
                       rf"{file_sha256(models['good'])} recorded at registration \(the logged model's metadata "):
        mlflow.pyfunc.load_model(str(copy))


def test_registered_model_loads_and_predicts_without_unpickling(store, models, data_dir, monkeypatch):
    import pickle

    import cloudpickle

    _log(models["good"])
    ds = dataset.load(data_dir)
    images = np.asarray(ds.splits["test"].images[:6])

    def refuse(*args, **kwargs):
        raise AssertionError("something was unpickled")

    for module in (pickle, cloudpickle):
        monkeypatch.setattr(module, "load", refuse)
        monkeypatch.setattr(module, "loads", refuse)
    monkeypatch.setattr(pickle, "Unpickler", refuse)
    pm = mlflow.pyfunc.load_model(f"models:/{NAME}@challenger")
    out = pm.predict(pd.DataFrame({"image": [_png_b64(im) for im in images]}))
    assert list(out["label_index"]) == list(ds.splits["test"].labels[:6])


def test_predict_paths_writes_labelled_csv(store, models, data_dir, tmp_path, capsys):
    _log(models["good"])
    ds = dataset.load(data_dir)
    folder = tmp_path / "incoming"
    (folder / "nested").mkdir(parents=True)
    expected = {}
    for i in range(15):
        img = np.asarray(ds.splits["test"].images[i])
        sub = folder / "nested" if i % 2 else folder
        p = sub / f"img{i:02d}.png"
        if i % 3 == 0:  # some arrive larger and in colour; JPEG too
            img = np.repeat(np.kron(img, np.ones((2, 2, 1), np.uint8)), 3, axis=2)
            p = p.with_suffix(".JPG")
            Image.fromarray(img).save(p, format="JPEG", quality=95)
        else:
            Image.fromarray(img[:, :, 0]).save(p)
        expected[str(p)] = CLASSES[ds.splits["test"].labels[i]]
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    (folder / "notes.txt").write_text("not an image, not a PNG/JPEG suffix: skipped")
    explicit = tmp_path / "listed.bin"
    explicit.write_bytes(b"junk")
    out_csv = tmp_path / "out" / "predictions.csv"

    with pytest.raises(PredictionFailed, match=f"2 of 17 files could not be predicted; see the error column of {out_csv}"):
        predict_paths(f"models:/{NAME}@challenger", [folder, explicit], out_csv, batch_size=4)
    rows = list(csv.DictReader(out_csv.open()))  # every row was written first
    assert len(rows) == 17
    assert list(rows[0]) == ["path", "label", "probability", "error"]
    by_path = {r["path"]: r for r in rows}
    assert set(by_path) == set(expected) | {str(folder / "broken.png"), str(explicit)}
    for path, label in expected.items():
        assert by_path[path]["label"] == label and by_path[path]["error"] == ""
        assert 1 / 3 <= float(by_path[path]["probability"]) <= 1
    for bad in (folder / "broken.png", explicit):
        assert by_path[str(bad)]["label"] == "" and by_path[str(bad)]["error"]
    assert by_path[str(explicit)]["error"] == "cannot decode image bytes: not a PNG/JPEG image (unrecognised format)"
    err = capsys.readouterr().err
    assert "broken.png" in err and "listed.bin" in err
    assert predict_paths(f"models:/{NAME}@challenger", sorted(map(Path, expected)), out_csv) == 15  # all good: no error

    # identical to what the served model says for the same files
    pm = mlflow.pyfunc.load_model(f"models:/{NAME}@challenger")
    paths = sorted(expected)
    served = pm.predict(pd.DataFrame({"image": [base64.b64encode(Path(p).read_bytes()).decode() for p in paths]}))
    assert list(served["label"]) == [by_path[p]["label"] for p in paths]
    assert [f"{x:.6f}" for x in served["probability"]] == [by_path[p]["probability"] for p in paths]


def test_predict_paths_errors(store, models, tmp_path):
    _log(models["good"])
    with pytest.raises(FileNotFoundError, match="no such file"):
        predict_paths(f"models:/{NAME}@challenger", [tmp_path / "missing"], tmp_path / "o.csv")
    (tmp_path / "empty").mkdir()
    with pytest.raises(RegistryError, match="no PNG/JPEG files"):
        predict_paths(f"models:/{NAME}@challenger", [tmp_path / "empty"], tmp_path / "o.csv")
    assert not (tmp_path / "o.csv").exists()


# ------------------------------------------------------------------------------------------
# serving






@pytest.mark.slow
def test_mlflow_models_serve_classifies_png(store, models, data_dir, tmp_path):
    _log(models["good"])
    MlflowClient().set_registered_model_alias(NAME, "champion", "1")
    with model_server(f"models:/{NAME}@champion", store, tmp_path) as base:
        ds = dataset.load(data_dir)
        images, labels = ds.splits["test"].images[:6], ds.splits["test"].labels[:6]
        status, body = post(
            f"{base}/invocations",
            {"dataframe_split": {"columns": ["image"], "data": [[_png_b64(im)] for im in images]}},
        )
        assert status == 200, body
        preds = body["predictions"]
        assert [p["label"] for p in preds] == [CLASSES[k] for k in labels]
        assert all(abs(sum(p[f"prob_{c}"] for c in CLASSES) - 1) < 1e-6 for p in preds)

        # a bad row gets its own error; the other rows are answered
        rows = [[_png_b64(images[0])], ["bm90IGFuIGltYWdl"], [_png_b64(images[1])]]
        status, body = post(f"{base}/invocations", {"dataframe_split": {"columns": ["image"], "data": rows}})
        assert status == 200, body
        preds = body["predictions"]
        assert [p["error"] for p in preds[::2]] == ["", ""] and [p["label"] for p in preds[::2]] == [CLASSES[k] for k in labels[:2]]
        assert preds[1]["error"].startswith("cannot decode image bytes: not a PNG/JPEG image") and preds[1]["label"] is None
        # too many rows: a clear 400, no server traceback
        status, body = post(
            f"{base}/invocations", {"dataframe_split": {"columns": ["image"], "data": [[_png_b64(images[0])]] * (MAX_BATCH_ROWS + 1)}}
        )
        assert status == 400 and body["error_code"] == "INVALID_PARAMETER_VALUE"
        assert body["message"] == f"{MAX_BATCH_ROWS + 1} rows in one request; the limit is {MAX_BATCH_ROWS}: split the batch"
        assert "stack_trace" not in body and "Traceback" not in json.dumps(body)
        # over the pixel budget: 413 and the reason, from the headers
        full = base64.b64encode(_huge_png(4096)).decode()
        rows = MAX_REQUEST_PIXELS // MAX_IMAGE_PIXELS + 1
        status, body = post(f"{base}/invocations", {"dataframe_split": {"columns": ["image"], "data": [[full]] * rows}})
        assert status == 413 and body["message"] == (
            f"{rows * MAX_IMAGE_PIXELS} pixels in one request's images; the limit is {MAX_REQUEST_PIXELS} "
            "(16 images of 4096x4096): split the batch"
        )



@pytest.mark.slow
def test_mlflow_models_serve_refuses_a_changed_model(store, models, tmp_path):
    _log(models["good"])
    _stored_weights(tmp_path).write_bytes(models["bad"].read_bytes())
    with pytest.raises(pytest.fail.Exception, match=r"(?s)exited with .*ChangedModelError: .*\.pt: SHA-256 [0-9a-f]{64} "
                       rf"differs from {file_sha256(models['good'])} recorded at registration \(registry tag"):
        with model_server(f"models:/{NAME}/1", store, tmp_path):
            pass
