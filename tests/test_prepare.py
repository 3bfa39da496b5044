import json

import numpy as np
import pytest

from visionops.config import AugmentConfig, BalanceConfig, DataConfig
from visionops.data import dataset
from visionops.data.download import run_download
from visionops.tasks.classification.balance import class_weights, simulate_long_tail
from visionops.tasks.classification.prepare import run_prepare


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    out = tmp_path_factory.mktemp("digits") / "ds"
    run_download(DataConfig(), out)
    return out


def _prepare(digits, tmp_path, **balance):
    summary = run_prepare(digits, BalanceConfig(**balance), AugmentConfig(rotate_degrees=15, crop_padding=2), tmp_path / "p", tmp_path / "r")
    labels = dataset.load(digits).splits["train"].labels
    idx = np.load(tmp_path / "p" / "train_indices.npy")
    return summary, np.bincount(labels[idx], minlength=10), json.loads((tmp_path / "p" / "loss.json").read_text())


def test_none_keeps_every_train_image(digits, tmp_path):
    summary, counts, loss = _prepare(digits, tmp_path)
    assert counts.sum() == summary["train_images_source"] == len(dataset.load(digits).splits["train"])
    assert loss == {"class_weights": None, "class_priors": None}
    policy = json.loads((tmp_path / "p" / "policy.json").read_text())
    assert policy["augment"]["rotate_degrees"] == 15 and policy["balance"]["strategy"] == "none"
    assert not (tmp_path / "r" / "class_distribution.png").exists()  # dvc.yaml's bar chart draws the csv
    rows = (tmp_path / "r" / "class_distribution.csv").read_text().splitlines()
    assert rows[0] == "class_name,source,long_tail,after" and len(rows) == 11


def test_long_tail_profile_is_exponential(digits, tmp_path):
    summary, counts, _ = _prepare(digits, tmp_path, simulate_imbalance_factor=10)
    source = np.bincount(dataset.load(digits).splits["train"].labels, minlength=10)
    profile = (source.max() * 10.0 ** (-np.arange(10) / 9)).astype(int)  # n_max * factor**(-c / 9), capped by class c
    assert np.array_equal(counts, np.minimum(profile, source)) and counts[9] == source.max() // 10
    assert np.all(np.diff(counts) <= 0)
    assert summary["imbalance_ratio_before"] == pytest.approx(counts.max() / counts.min(), rel=1e-3)


@pytest.mark.parametrize("strategy", ["oversample", "undersample"])
def test_resampling_balances_classes(digits, tmp_path, strategy):
    summary, counts, _ = _prepare(digits, tmp_path, strategy=strategy, simulate_imbalance_factor=10)
    assert len(set(counts)) == 1 and summary["imbalance_ratio_after"] == 1.0
    assert counts[0] == (summary["train_images_after"] // 10)


def test_loss_side_strategies_save_weights_and_priors(digits, tmp_path):
    _, counts, loss = _prepare(digits, tmp_path / "w", strategy="class_weights", simulate_imbalance_factor=5)
    w = np.array(loss["class_weights"])
    assert np.allclose(w * counts, counts.sum() / 10)  # every class carries equal total weight
    _, counts, loss = _prepare(digits, tmp_path / "p", strategy="logit_adjust", simulate_imbalance_factor=5)
    assert np.allclose(loss["class_priors"], counts / counts.sum())


def test_balance_helpers_on_known_case():
    assert np.allclose(class_weights(np.array([30, 10, 0])), [40 / 60, 40 / 20, 0])
    labels = np.repeat(np.arange(3), 100)
    kept = simulate_long_tail(labels, 3, 100.0, np.random.default_rng(0))
    assert list(np.bincount(labels[kept])) == [100, 10, 1]


def test_offline_oversampling_writes_augmented_copies(digits, tmp_path):
    aug = AugmentConfig(rotate_degrees=20, crop_padding=2)
    summary = run_prepare(digits, BalanceConfig(strategy="oversample", offline=True, simulate_imbalance_factor=4), aug, tmp_path / "p", tmp_path / "r")
    idx = np.load(tmp_path / "p" / "train_indices.npy")
    extra_x, extra_y = np.load(tmp_path / "p" / "offline" / "images.npy"), np.load(tmp_path / "p" / "offline" / "labels.npy")
    train = dataset.load(digits).splits["train"]
    assert len(np.unique(idx)) == len(idx)  # originals once each
    counts = np.bincount(np.concatenate([train.labels[idx], extra_y]), minlength=10)
    assert len(set(counts)) == 1 and summary["offline_augmented"] == len(extra_y) > 0
    assert extra_x.dtype == np.uint8 and extra_x.shape[1:] == train.images.shape[1:]
    originals = {img.tobytes() for img in train.images}
    assert sum(img.tobytes() in originals for img in extra_x) < len(extra_x) // 10  # augmented, not repeats
