"""Content-hash splits: adding images never moves one, the holdout is frozen, fractions stay close."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from PIL import Image
from scipy.stats import binomtest

from visionops.config import DataConfig, ParamsError
from visionops.data import dataset
from visionops.data.download import run_download
from visionops.data.splits import hash_split, position

CLASSES = ("circle", "square", "stripes")
PARTS = ("train", "val", "test", "holdout")
FRACTIONS = {"holdout": 0.1, "val": 0.15, "test": 0.2}


def _picture(cls: int, rng: np.random.Generator) -> Image.Image:
    """A 20x20 RGB picture: a class-specific shape at a random place and colour over noise."""
    yy, xx = np.mgrid[:20, :20]
    cy, cx, r = rng.integers(6, 14), rng.integers(6, 14), rng.integers(3, 6)
    mask = [
        (yy - cy) ** 2 + (xx - cx) ** 2 < r**2,
        (abs(yy - cy) < r) & (abs(xx - cx) < r),
        (xx // 3) % 2 == 0,
    ][cls]
    img = rng.integers(0, 90, (20, 20, 3))
    img[mask] = rng.integers(120, 256, 3)
    return Image.fromarray(img.astype(np.uint8))


def _write(root, start: int, count: int, seed: int) -> None:
    """`count` images per class named start..start+count-1, alternately PNG and JPEG."""
    rng = np.random.default_rng(seed)
    for c, name in enumerate(CLASSES):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(start, start + count):
            _picture(c, rng).save(root / name / f"{i:04d}.{'png' if i % 2 else 'jpg'}")


def _assignment(ds_dir, holdout_dir) -> dict[str, str]:
    """Source path -> the split it landed in, holdout included."""
    splits = {**dataset.load(ds_dir).splits, **dataset.load(holdout_dir).splits}
    assert set(splits) == set(PARTS)
    return {path: name for name, split in splits.items() for path in split.paths}


def _download(root, out, **kw) -> dict[str, str]:
    fractions = {f"{k}_fraction": v for k, v in FRACTIONS.items()}
    cfg = DataConfig(source="folder", root=str(root), channels=3, image_size=16, **{**fractions, **kw})
    run_download(cfg, out / "dataset", out / "holdout")
    return _assignment(out / "dataset", out / "holdout")


def test_adding_images_moves_none_and_keeps_fractions(tmp_path):
    root = tmp_path / "photos"
    _write(root, 0, 100, seed=0)
    for c in CLASSES:  # exact duplicates under other names
        for name in ("0001.png", "0002.jpg"):
            shutil.copy(root / c / name, root / c / f"dup-{name}")
    before = _download(root, tmp_path / "v1")
    assert len(before) == 306
    for c in CLASSES:
        for name in ("0001.png", "0002.jpg"):
            assert before[str(root / c / name)] == before[str(root / c / f"dup-{name}")]

    _write(root, 100, 20, seed=1)  # 20% more images
    after = _download(root, tmp_path / "v2")
    assert len(after) == 366
    moved = {p: (s, after[p]) for p, s in before.items() if after[p] != s}
    assert moved == {}
    new = [after[p] for p in set(after) - set(before)]
    assert set(new) == set(PARTS)  # the new images spread over every part

    labels = {p: p.split("/")[-2] for p in after}
    for c in CLASSES:
        members = [p for p in after if labels[p] == c]
        for name, frac in FRACTIONS.items():
            k = sum(after[p] == name for p in members)
            assert binomtest(k, len(members), frac).pvalue > 0.001, (c, name, k, len(members))


def test_holdout_depends_on_its_fraction_and_seed_only(tmp_path):
    root = tmp_path / "photos"
    _write(root, 0, 40, seed=2)
    a = _download(root, tmp_path / "a")
    b = _download(root, tmp_path / "b", val_fraction=0.3, test_fraction=0.0)
    holdout = {p for p, s in a.items() if s == "holdout"}
    assert holdout and holdout == {p for p, s in b.items() if s == "holdout"}
    c = _download(root, tmp_path / "c", seed=7)
    assert holdout != {p for p, s in c.items() if s == "holdout"}


def test_hash_split_is_interval_lookup_and_keeps_a_train_image_per_class():
    hashes = [f"{i:032x}" for i in range(400)]
    labels = np.zeros(400, np.int64)
    parts = hash_split(labels, hashes, {"a": 0.25, "b": 0.25}, seed=3)
    u = np.array([position(h, 3) for h in hashes])
    assert np.array_equal(parts["a"], np.flatnonzero(u < 0.25))
    assert np.array_equal(parts["b"], np.flatnonzero((u >= 0.25) & (u < 0.5)))
    assert np.array_equal(parts["train"], np.flatnonzero(u >= 0.5))

    forced = 0
    for seed in range(20):  # a class of 3 images with 90% of [0, 1) outside train
        parts = hash_split(np.array([0, 0, 0, 1]), hashes[:4], {"a": 0.45, "b": 0.45}, seed)
        u = np.array([position(h, seed) for h in hashes[:4]])
        train = set(parts["train"].tolist())
        assert {0, 1, 2} & train and 3 in train
        if not np.any(u[:3] >= 0.9):
            forced += 1
            assert train & {0, 1, 2} == {int(np.argmax(u[:3]))}
    assert forced > 0


def test_duplicates_share_a_part_across_classes():
    hashes = ["x", "y", "x", "z", "x"]
    parts = hash_split(np.array([0, 0, 1, 1, 1]), hashes, {"test": 0.5}, seed=0)
    where = {i: name for name, idx in parts.items() for i in idx}
    assert where[0] == where[2] == where[4]


def test_fractions_leaving_no_train_are_refused(tmp_path):
    cfg = DataConfig(holdout_fraction=0.4, val_fraction=0.3, test_fraction=0.3)
    with pytest.raises(ParamsError, match=r"data.holdout_fraction \+ data.val_fraction \+ data.test_fraction = 1"):
        run_download(cfg, tmp_path / "ds", tmp_path / "holdout")
    assert not (tmp_path / "ds").exists() and not (tmp_path / "holdout").exists()
