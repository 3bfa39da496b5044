"""Identity-hash splits: adding images never moves one, nor do data.image_size and data.channels; the holdout is
frozen; fractions stay close; no image is moved into train to fill a class."""

from __future__ import annotations

import hashlib
import shutil

import numpy as np
import pytest
from PIL import Image
from scipy.stats import binomtest

import dense_folders as F
from cifar_archive import write_cifar10_archive
from visionops.config import DataConfig, ParamsError, ValidateConfig
from visionops.data import dataset
from visionops.data.download import run_download
from visionops.data.images import file_hash
from visionops.data.splits import hash_split, position
from visionops.errors import ValidationFailed
from visionops.tasks import get_task
from visionops.tasks.classification.validate import run_validate

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


def _cifar(tmp_path) -> dict:
    rng = np.random.default_rng(4)
    images, labels = rng.integers(0, 256, (70, 32, 32, 3), dtype=np.uint8), np.arange(70) % 10
    archive = write_cifar10_archive(tmp_path / "cifar-10-python.tar.gz", images[:60], labels[:60], images[60:],
                                    labels[60:], [f"c{i}" for i in range(10)])
    md5 = hashlib.md5(archive.read_bytes()).hexdigest()
    return dict(source="cifar10", url=str(archive), md5=md5, cache_dir=str(tmp_path / "cache"))


def _folder(tmp_path) -> dict:
    _write(tmp_path / "photos", 0, 30, seed=5)
    return dict(source="folder", root=str(tmp_path / "photos"))


def _canvases(tmp_path) -> dict:
    return dict(source="canvases", cache_dir=str(tmp_path / "cache"), canvases={"count": 60})


# data.source -> (task, the DataConfig fields of a small offline copy of it)
SOURCES = {
    "digits": ("classification", lambda tmp_path: {}),
    "cifar10": ("classification", _cifar),
    "folder": ("classification", _folder),
    "canvases-boxes": ("detection", _canvases),
    "canvases-masks": ("segmentation", _canvases),
    "coco": ("detection", lambda tmp_path: dict(source="coco", root=str(F.coco_folder(tmp_path / "coco")))),
    "voc": ("detection", lambda tmp_path: dict(source="voc", root=str(F.voc_folder(tmp_path / "voc")))),
    "yolo": ("detection", lambda tmp_path: dict(source="yolo", root=str(F.yolo_folder(tmp_path / "yolo")))),
    "masks": ("segmentation", lambda tmp_path: dict(source="masks", root=str(F.masks_folder(tmp_path / "masks")))),
}


@pytest.mark.parametrize("source", list(SOURCES))
def test_image_size_and_channels_move_no_image(tmp_path, source):
    task, fields = SOURCES[source]
    base = {**fields(tmp_path), "holdout_fraction": 0.2, "val_fraction": 0.2, "test_fraction": 0.2}
    seen = []
    for image_size, channels in ((16, 1), (40, 1), (16, 3)):
        out = tmp_path / f"{image_size}-{channels}"
        cfg = DataConfig(**base, image_size=image_size, channels=channels)
        run_download(cfg, out / "dataset", out / "holdout", task=task, targets=get_task(task).targets)
        assert dataset.load(out / "holdout").image_shape == (image_size, image_size, channels)
        seen.append(_assignment(out / "dataset", out / "holdout"))
    assert set(seen[0].values()) == set(PARTS)  # every part holds images
    assert seen[1] == seen[0] and seen[2] == seen[0]


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
            assert before[f"{c}/{name}"] == before[f"{c}/dup-{name}"]

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


def test_hash_split_is_interval_lookup():
    hashes = [f"{i:032x}" for i in range(400)]
    parts = hash_split(hashes, {"a": 0.25, "b": 0.25}, seed=3)
    u = np.array([position(h, 3) for h in hashes])
    assert np.array_equal(parts["a"], np.flatnonzero(u < 0.25))
    assert np.array_equal(parts["b"], np.flatnonzero((u >= 0.25) & (u < 0.5)))
    assert np.array_equal(parts["train"], np.flatnonzero(u >= 0.5))


def _named_into(path, make, lo: float, hi: float) -> None:
    """Write `make()` images to `path` until the file's identity hashes into [lo, hi) with seed 0."""
    while True:
        make().save(path)
        if lo <= position(file_hash(path), 0) < hi:
            return


def test_a_class_hashed_outside_train_stays_so_and_grows_without_moving(tmp_path):
    """No image is ever moved to fill a class: a class whose every image hashed outside train has no train
    image, and validate fails naming it until images of it are added. (Its only image used to be kept in
    train, and moved into the holdout when a second image arrived.)"""
    root = tmp_path / "photos"
    _write(root, 0, 30, seed=6)
    (root / "rare").mkdir()
    rng = np.random.default_rng(7)
    _named_into(root / "rare" / "a.png", lambda: _picture(1, rng), 0.0, FRACTIONS["holdout"])
    before = _download(root, tmp_path / "v1")
    assert before["rare/a.png"] == "holdout"
    with pytest.raises(ValidationFailed, match="every class has train images") as exc:
        run_validate(tmp_path / "v1" / "dataset", ValidateConfig(), tmp_path / "r1")
    assert [f["offending"] for f in exc.value.summary["critical_failures"]] == [["rare"]]

    _named_into(root / "rare" / "b.png", lambda: _picture(1, rng), sum(FRACTIONS.values()), 1.0)
    after = _download(root, tmp_path / "v2")
    assert after == {**before, "rare/b.png": "train"}
    assert run_validate(tmp_path / "v2" / "dataset", ValidateConfig(), tmp_path / "r2")["success"]


def test_duplicates_share_a_part_across_classes():
    hashes = ["x", "y", "x", "z", "x"]
    parts = hash_split(hashes, {"test": 0.5}, seed=0)
    where = {i: name for name, idx in parts.items() for i in idx}
    assert where[0] == where[2] == where[4]


def test_fractions_leaving_no_train_are_refused(tmp_path):
    cfg = DataConfig(holdout_fraction=0.4, val_fraction=0.3, test_fraction=0.3)
    with pytest.raises(ParamsError, match=r"data.holdout_fraction \+ data.val_fraction \+ data.test_fraction = 1"):
        run_download(cfg, tmp_path / "ds", tmp_path / "holdout")
    assert not (tmp_path / "ds").exists() and not (tmp_path / "holdout").exists()
