"""Stage pretrain (SimSiam on the train images without labels) and data.label_fraction: real torch training on
tiny real data, a real sqlite MLflow store."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from visionops.config import AugmentConfig, BalanceConfig, DataConfig, PretrainConfig, parse_params
from visionops.data import dataset
from visionops.data.download import run_download
from visionops.data.labelled import labelled_rows
from visionops.errors import InvalidInputError
from visionops.models import create_model, encoders, model_file
from visionops.tasks.classification.prepare import run_prepare
from visionops.training import pretrain
from visionops.training.views import StrongViews, blur, resized_crop


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("digits") / "ds"
    run_download(DataConfig(), out)
    return out


def _params(root: Path | None = None, model: str = "resnet8", task: str = "classification", **pre):
    data = {"source": "digits", "image_size": 16} if root is None else {"source": "folder", "root": str(root)}
    if task != "classification":
        data = {"source": "canvases", "image_size": 32}
    return parse_params({"task": task, "data": data, "train": {"model": model, "device": "cpu", "threads": 1},
                         "distill": {"student": {"classification": "resnet8", "detection": "centernet_tiny",
                                                 "segmentation": "unet_small"}[task]},
                         "label_issues": {"enabled": False}, "evaluate": {"gradcam_samples": 0},
                         "pretrain": {"enabled": True, "epochs": 2, "batch_size": 64, "projection_dim": 64,
                                      "prediction_dim": 16, "hflip": False, **pre}})


# data.label_fraction -------------------------------------------------------------------------------------------

def test_label_fraction_is_a_stable_hash_choice(digits):
    train = dataset.load(digits).splits["train"]
    kept = labelled_rows(train, 0.3, seed=0)
    assert 0.2 < len(kept) / len(train) < 0.4
    assert set(kept) <= set(labelled_rows(train, 0.6, seed=0))  # a larger fraction keeps a superset
    assert set(kept) != set(labelled_rows(train, 0.3, seed=1))
    # removing images (a smaller dataset) keeps the same images' labels: the choice is per image, not a permutation
    half = dataset.Split(train.images[::2], train.labels[::2], train.paths[::2])
    assert [half.paths[i] for i in labelled_rows(half, 0.3, 0)] == [train.paths[i] for i in kept if i % 2 == 0]
    assert len(labelled_rows(train, 1.0, 0)) == len(train)


def test_label_fraction_is_drawn_apart_from_the_split(digits):
    """Train images all sit in the split's last interval of [0, 1): the labels' draw must not reuse it."""
    train = dataset.load(digits).splits["train"]
    assert len(labelled_rows(train, 0.1, seed=0)) > 0.05 * len(train)


def test_prepare_trains_on_the_labelled_share_and_counts_both(digits, tmp_path):
    summary = run_prepare(digits, BalanceConfig(), AugmentConfig(), tmp_path / "p", tmp_path / "r", None, 0.25, 0)
    idx = np.load(tmp_path / "p" / "train_indices.npy")
    train = dataset.load(digits).splits["train"]
    assert idx.tolist() == labelled_rows(train, 0.25, 0).tolist()
    assert summary["labelled_images"] == len(idx) and summary["unlabelled_images"] == len(train) - len(idx)
    assert summary["train_images_after"] == len(idx)


def test_dense_prepare_applies_the_fraction_to_images(tmp_path):
    from visionops.tasks.detection.prepare import run_prepare as detection_prepare

    ds = _dense_dataset(tmp_path / "ds", "detection", n=40)
    summary = detection_prepare(ds, BalanceConfig(), AugmentConfig(), tmp_path / "p", tmp_path / "r", 0.5, 0)
    train = dataset.load(ds).splits["train"]
    assert np.load(tmp_path / "p" / "train_indices.npy").tolist() == labelled_rows(train, 0.5, 0).tolist()
    assert summary["labelled_images"] + summary["unlabelled_images"] == len(train) == summary["train_images_source"]
    assert 0 < summary["unlabelled_images"] < len(train)


# the two views --------------------------------------------------------------------------------------------------

def test_views_are_per_image_and_seeded():
    x = torch.rand(8, 3, 16, 16)
    views = StrongViews(PretrainConfig(blur_prob=0.5))
    a, b = views(x, torch.Generator().manual_seed(1)), views(x, torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and a.shape == x.shape and 0 <= a.min() and a.max() <= 1
    c = views(x, torch.Generator().manual_seed(2))
    assert not torch.equal(a, c)
    same = views(x[:1].expand(8, -1, -1, -1).contiguous(), torch.Generator().manual_seed(3))
    assert len({tuple(v.flatten()[:20].tolist()) for v in same}) == 8  # one image, eight different views


def test_crop_and_blur_geometry():
    x = torch.arange(16.0).view(1, 1, 4, 4) / 16
    whole = resized_crop(x, torch.ones(1), torch.zeros(1), torch.zeros(1, 2), torch.tensor([False]))
    assert torch.allclose(whole, x, atol=1e-6)
    mirrored = resized_crop(x, torch.ones(1), torch.zeros(1), torch.zeros(1, 2), torch.tensor([True]))
    assert torch.allclose(mirrored, x.flip(-1), atol=1e-6)
    flat = torch.full((2, 3, 9, 9), 0.4)
    assert torch.allclose(blur(flat, torch.tensor([0.5, 1.5])), flat, atol=1e-6)
    spike = torch.zeros(1, 1, 9, 9)
    spike[0, 0, 4, 4] = 1
    blurred = blur(spike, torch.tensor([1.0]))
    assert blurred.sum().item() == pytest.approx(1.0, abs=1e-5) and blurred[0, 0, 4, 4] < 0.5


# the stage --------------------------------------------------------------------------------------------------------

def test_disabled_writes_a_stub_and_trains_nothing(digits, tmp_path):
    params = _params(enabled=False)
    result = pretrain.run_pretrain(params, digits, tmp_path / "backbone.pt", tmp_path / "r", None)
    assert result["enabled"] is False
    assert model_file.load_weights_only(tmp_path / "backbone.pt", "") == {"task": "backbone", "enabled": False}
    first = (tmp_path / "backbone.pt").read_bytes()
    pretrain.run_pretrain(params, digits, tmp_path / "backbone.pt", tmp_path / "r", None)
    assert (tmp_path / "backbone.pt").read_bytes() == first  # the same bytes: train is not rerun for it


def test_pretrain_lowers_the_loss_without_collapse_and_probes_both_encoders(digits, tmp_path):
    """8 epochs on 1,083 digits: the loss falls, the outputs stay spread, and the kNN probe scores the trained
    encoder and the random one far above chance (on digits neither is reliably ahead: see bench/README.md)."""
    params = _params(epochs=8, batch_size=128, lr=0.06)
    result = pretrain.run_pretrain(params, digits, tmp_path / "backbone.pt", tmp_path / "r", tmp_path / "c.pt")
    history = model_file.load_weights_only(tmp_path / "backbone.pt", "")["history"]
    assert history[-1]["train_loss"] < history[0]["train_loss"] - 0.1, history
    assert min(row["output_std"] for row in history) > 0.3
    assert result["knn_acc"] > 0.5 and result["knn_acc_random_init"] > 0.5, result
    assert result["knn_memory_images"] == result["images"]  # data.label_fraction 1: every train label
    assert not (tmp_path / "c.pt").exists()  # the checkpoint is gone once the file is written
    details = json.loads((tmp_path / "r" / "details.json").read_text())
    assert "train_seconds" not in details and details["knn_acc"] == result["knn_acc"]


@pytest.mark.parametrize("task, arch", [("classification", "resnet8"), ("detection", "centernet_tiny"),
                                        ("segmentation", "unet_small")])
def test_backbone_file_holds_the_encoder_under_canonical_names(digits, tmp_path, task, arch):
    ds = digits if task == "classification" else _dense_dataset(tmp_path / "ds", task)
    params = _params(model=arch, task=task, epochs=1, batch_size=16)
    result = pretrain.run_pretrain(params, ds, tmp_path / "backbone.pt", tmp_path / "r", None)
    info = model_file.load_weights_only(tmp_path / "backbone.pt", "")
    shape = tuple(dataset.load(ds).image_shape)
    fresh = create_model(arch, in_channels=shape[2], num_classes=2, image_size=shape[0])
    expected = encoders.to_canonical(fresh.state_dict(), arch)
    assert info["task"] == "backbone" and info["enabled"] and info["arch"] == arch and info["image_shape"] == list(shape)
    assert {k: v.shape for k, v in info["encoder"].items()} == {k: v.shape for k, v in expected.items()}
    fresh.load_state_dict(encoders.from_canonical(info["encoder"], arch), strict=False)  # loads by name and shape
    assert len(info["mean"]) == len(info["std"]) == shape[2]
    assert ("knn_acc" in result) == (task == "classification")


def test_an_interrupted_run_resumes_to_the_same_file(tmp_path):
    ds = _dense_dataset(tmp_path / "ds", "segmentation", n=64)
    params = _params(model="unet_small", task="segmentation", epochs=3, batch_size=8)
    pretrain.run_pretrain(params, ds, tmp_path / "whole.pt", tmp_path / "r1", tmp_path / "c1.pt")

    def stop_after_first(desc, row):
        if row["epoch"] == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        pretrain.run_pretrain(params, ds, tmp_path / "resumed.pt", tmp_path / "r2", tmp_path / "c2.pt",
                              on_epoch=stop_after_first)
    assert (tmp_path / "c2.pt").exists() and not (tmp_path / "resumed.pt").exists()
    epochs = []
    pretrain.run_pretrain(params, ds, tmp_path / "resumed.pt", tmp_path / "r2", tmp_path / "c2.pt",
                          on_epoch=lambda desc, row: epochs.append(row["epoch"]))
    assert epochs == [2, 3]
    assert (tmp_path / "resumed.pt").read_bytes() == (tmp_path / "whole.pt").read_bytes()


def test_unlabelled_root_adds_images_inside_the_data_roots_only(image_folder, tmp_path):
    root = shutil.copytree(image_folder, tmp_path / "tree")
    (root / "extra").mkdir()
    for i in range(5):
        Image.fromarray(np.full((20, 20, 3), 40 * i, np.uint8)).save(root / "extra" / f"{i}.png")
    (root / "extra" / "notes.txt").write_text("not an image")
    images = pretrain.unlabelled_images(_params(root=root, unlabelled_root="extra"))
    assert images.shape == (5, 32, 32, 1) and images[:, 0, 0, 0].tolist() == [0, 40, 80, 120, 160]
    outside = tmp_path / "outside"
    outside.mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(outside / "a.png")
    with pytest.raises(InvalidInputError, match="pretrain.unlabelled_root.*outside data.root"):
        pretrain.unlabelled_images(_params(root=root, unlabelled_root=str(outside)))
    with pytest.raises(InvalidInputError, match="pretrain.unlabelled_root.*no data.root"):
        pretrain.unlabelled_images(_params(unlabelled_root=str(outside)))


def test_a_model_without_an_encoder_is_refused_by_name(digits, tmp_path):
    with pytest.raises(InvalidInputError, match="'fastnet'"):
        pretrain.run_pretrain(_params(model="fastnet"), digits, tmp_path / "b.pt", tmp_path / "r", None)


def test_registered_once_per_content_as_a_downloadable_artifact(digits, tmp_path, store):
    import mlflow

    params = _params(epochs=1)
    pretrain.run_pretrain(params, digits, tmp_path / "backbone.pt", tmp_path / "r", None)
    with mlflow.start_run():
        first = pretrain.register(tmp_path / "backbone.pt", "visionops-backbone", {"k": "v"})
    with mlflow.start_run():
        again = pretrain.register(tmp_path / "backbone.pt", "visionops-backbone", {})
    assert first == {"name": "visionops-backbone", "version": "1", "created": True}
    assert again == {**first, "created": False}
    version = mlflow.MlflowClient().get_model_version("visionops-backbone", "1")
    assert version.tags["visionops.arch"] == "resnet8" and version.tags["k"] == "v"
    fetched = Path(mlflow.artifacts.download_artifacts("models:/visionops-backbone/1")) / "backbone.pt"
    digest = hashlib.md5(fetched.read_bytes()).hexdigest()
    assert digest == hashlib.md5((tmp_path / "backbone.pt").read_bytes()).hexdigest()


def _dense_dataset(root: Path, task: str, n: int = 24) -> Path:
    """`n` random 32 x 32 greyscale images split 2:1:1, with empty targets (pretrain reads images only)."""
    rng = np.random.default_rng(0)

    def split(m: int, offset: int) -> dataset.Split:
        targets = ({"boxes": np.zeros((m, 1, 4), np.float32), "box_labels": np.full((m, 1), -1, np.int64)}
                   if task == "detection" else {"masks": np.zeros((m, 32, 32), np.uint8)})
        return dataset.Split(rng.integers(0, 256, (m, 32, 32, 1), dtype=np.uint8), np.zeros(m, np.int64),
                             [f"img{offset + i}" for i in range(m)], targets=targets)

    splits = {"train": split(n // 2, 0), "val": split(n // 4, n), "test": split(n // 4, 2 * n)}
    dataset.save(dataset.Dataset(["a", "b"], splits, "canvases", task=task), root)
    return root
