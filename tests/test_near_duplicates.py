"""Near-duplicate groups: a resized or noised copy lands in its original's part, validate reports the groups and
the duplicates whose labels differ, and sources the project generates keep their identity splits."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from visionops.config import DataConfig, ValidateConfig
from visionops.data import dataset
from visionops.data.dataset import Dataset, Split
from visionops.data.download import run_download
from visionops.data.dup_groups import same_labels
from visionops.data.neardup import BLOCK, group_identities, pairs
from visionops.data.sources import load_source
from visionops.data.splits import hash_split
from visionops.errors import ValidationFailed
from visionops.tasks.classification.validate import run_validate
from visionops.tasks.detection.validate import run_validate as run_detection_validate

RACCOON = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "raccoon-voc.tar.gz"
PARTS = ("train", "val", "test", "holdout")


def _photo(rng: np.random.Generator) -> Image.Image:
    """A 48x48 RGB picture of smooth random structure (a 6x6 grid upsampled), distinct from any other."""
    grid = rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)
    return Image.fromarray(grid).resize((48, 48), Image.Resampling.BICUBIC)


def _photos(root: Path, per_class: int, seed: int = 0) -> dict[str, list[str]]:
    """Two classes of originals, each with a resized PNG and a noised JPEG copy beside it; {original: copies}."""
    rng = np.random.default_rng(seed)
    copies = {}
    for cls in ("a", "b"):
        (root / cls).mkdir(parents=True)
        for i in range(per_class):
            img = _photo(rng)
            img.save(root / cls / f"{i:03d}.png")
            img.resize((36, 36), Image.Resampling.BILINEAR).save(root / cls / f"{i:03d}-small.png")
            noisy = np.clip(np.asarray(img, np.int16) + rng.normal(0, 2, (48, 48, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(noisy).save(root / cls / f"{i:03d}-noisy.jpg", quality=90)
            copies[f"{cls}/{i:03d}.png"] = [f"{cls}/{i:03d}-small.png", f"{cls}/{i:03d}-noisy.jpg"]
    return copies


def _download(root: Path, out: Path, **kw) -> dict[str, str]:
    """Download the folder `root`; source path -> its part, holdout included."""
    cfg = DataConfig(source="folder", root=str(root), channels=3, image_size=16, holdout_fraction=0.2,
                     val_fraction=0.2, test_fraction=0.2, **kw)
    run_download(cfg, out / "dataset", out / "holdout")
    splits = {**dataset.load(out / "dataset").splits, **dataset.load(out / "holdout").splits}
    return {path: name for name, split in splits.items() for path in split.paths}


def test_a_copy_lands_in_its_originals_part(tmp_path):
    copies = _photos(tmp_path / "photos", per_class=20)
    part = _download(tmp_path / "photos", tmp_path / "grouped")
    assert set(part.values()) == set(PARTS)
    assert all(part[c] == part[o] for o, cs in copies.items() for c in cs)
    ds = dataset.load(tmp_path / "grouped" / "dataset")
    holdout = dataset.load(tmp_path / "grouped" / "holdout")
    members: dict[str, set[str]] = {}
    for split in [*ds.splits.values(), *holdout.splits.values()]:
        for path, group in zip(split.paths, split.groups, strict=True):
            members.setdefault(group, set()).add(path)
    assert sorted(map(sorted, members.values())) == sorted(sorted([o, *cs]) for o, cs in copies.items())

    # hashed by identity alone, the copies scatter: grouping is what keeps them together
    apart = _download(tmp_path / "photos", tmp_path / "exact", near_duplicate_hash="none")
    assert sum(apart[c] != apart[o] for o, cs in copies.items() for c in cs) > 10
    assert not dataset.load(tmp_path / "exact" / "dataset").splits["train"].groups


def test_validate_names_duplicates_whose_classes_differ(tmp_path):
    root = tmp_path / "photos"
    copies = _photos(root, per_class=6)
    (root / "a" / "000-small.png").rename(root / "b" / "000-a-small.png")  # the copy now claims class b
    run_download(DataConfig(source="folder", root=str(root), channels=3, image_size=16, holdout_fraction=0.0,
                            val_fraction=0.0, test_fraction=0.0), tmp_path / "ds")
    summary = run_validate(tmp_path / "ds", ValidateConfig(), tmp_path / "reports")
    assert summary["success"]
    assert summary["near_duplicates"] | {"examples": None} == {
        "groups": len(copies), "images_in_groups": 3 * len(copies), "largest": 3, "spanning_splits": 0,
        "with_label_conflicts": 1, "examples": None}  # fmt: skip
    [warning] = [w for w in summary["warnings"] if w["column"] == "label_conflict"]
    # the group's first member (in path order) and the member whose class differs from it
    assert warning["offending"] == ["a/000-noisy.jpg", "b/000-a-small.png"]
    manifest = pd.read_csv(tmp_path / "reports" / "manifest.csv", keep_default_na=False).set_index("path")
    assert manifest.at["b/000-a-small.png", "conflicts_with"] == "a/000-noisy.jpg"
    assert manifest.loc[["a/000.png", "a/000-noisy.jpg"], "group"].nunique() == 1
    assert json.loads((tmp_path / "reports" / "metrics.json").read_text())["success"]

    with pytest.raises(ValidationFailed, match=r"same labels.*2 offending: a/000-noisy.jpg, b/000-a-small.png"):
        run_validate(tmp_path / "ds", ValidateConfig(on_label_conflict="error"), tmp_path / "reports")


def _members(split: Split, targets: dict) -> Dataset:
    return Dataset(["bg", "x", "y"], {"train": Split(split.images, split.labels, split.paths, targets=targets)}, "t",
                   task="detection" if "boxes" in targets else "segmentation")


def test_box_and_mask_conflicts_respect_the_tolerance():
    n = 5
    base = Split(np.zeros((n, 100, 100, 1), np.uint8), np.zeros(n, np.int64), [str(i) for i in range(n)])
    box = [10.0, 20.0, 50.0, 60.0]
    boxes = np.array([[box, [60, 60, 90, 90]],                      # 0: two objects
                      [[61, 59, 90, 91], [11, 21, 51, 59]],         # 1: the same, off by 1 px, other order
                      [[60, 60, 90, 90], [10, 20, 55, 60]],         # 2: a side 5 px off
                      [box, [60, 60, 90, 90]],                      # 3: the same boxes, another class
                      [box, [0, 0, 0, 0]]], np.float32)             # 4: one object fewer
    labels = np.array([[1, 2], [2, 1], [1, 2], [1, 1], [1, -1]])
    same = same_labels(_members(base, {"boxes": boxes, "box_labels": labels}), tolerance=0.02)
    assert [same(("train", 0), ("train", k)) for k in range(n)] == [True, True, False, False, False]

    masks = np.zeros((n, 100, 100), np.uint8)
    masks[:, 20:60, 20:60] = 1
    masks[1, 20:21, 20:60] = 0  # 40 of 10,000 pixels differ
    masks[2, 20:40, 20:60] = 2  # 800 differ
    same = same_labels(_members(base, {"masks": masks}), tolerance=0.02)
    assert [same(("train", 0), ("train", k)) for k in range(3)] == [True, True, False]


def test_pairs_match_a_brute_force_count():
    rng = np.random.default_rng(0)
    n = 2 * BLOCK + 37  # across block boundaries
    packed = rng.integers(0, 2**63, n, dtype=np.int64).astype(np.uint64)
    for k in range(0, n, 7):  # plant near copies, some across blocks
        j = (k * 31 + 5) % n
        packed[j] = packed[k] ^ np.uint64(sum(1 << int(b) for b in rng.choice(64, rng.integers(0, 6), False)))
    hashes = [f"{int(h):016x}" for h in packed]
    hashes[3] = ""  # an image without a perceptual hash is in no pair
    want = {(i, j) for i in range(n) for j in range(i + 1, n)
            if hashes[i] and hashes[j] and bin(int(packed[i]) ^ int(packed[j])).count("1") <= 4}
    i, j = pairs(hashes, 4)
    assert len(want) > 20 and set(zip(i.tolist(), j.tolist())) == want


def test_a_group_is_named_by_its_smallest_member_and_a_bridge_renames_the_later_group():
    far = ["0000000000000000", "ffffffffffffffff"]
    assert group_identities(["b", "c"], far, 4) == ["b", "c"]
    # a copy of c (identity d > c) joins c's group: c keeps its name, so its part
    assert group_identities(["b", "c", "d"], [*far, "ffffffffffffff00"], 8) == ["b", "c", "c"]
    # the documented limit: an added image near both groups joins them, and c's group takes b's name (and part)
    bridge = "00000000ffffffff"
    assert group_identities(["b", "c", "e"], [*far, bridge], 32) == ["b", "b", "b"]
    # an exact copy (one identity) is one group even without perceptual hashes
    assert group_identities(["b", "b", "c"], [], 4) == ["b", "b", "c"]


def test_generated_sources_keep_their_identity_splits(tmp_path):
    """8x8 digits collide in pHash (distinct digits of one class within 4 bits), so sources the project
    generates (digits, cifar10, canvases) are never perceptually hashed: their splits stay the identity splits."""
    cfg = DataConfig()
    run_download(cfg, tmp_path / "ds", tmp_path / "holdout")
    ds, holdout = dataset.load(tmp_path / "ds"), dataset.load(tmp_path / "holdout")
    assert not any(s.groups for s in [*ds.splits.values(), *holdout.splits.values()])
    assert "group" not in (tmp_path / "ds" / "train" / "manifest.csv").read_text().splitlines()[0]
    source = load_source(cfg).splits["train"]
    parts = hash_split(source.identities, {"holdout": 0.1, "val": 0.1, "test": 0.2}, cfg.seed)
    got = {**{n: s.paths for n, s in ds.splits.items()}, "holdout": holdout.splits["holdout"].paths}
    assert {n: [source.paths[i] for i in idx] for n, idx in parts.items()} == got


def test_canvases_are_not_perceptually_hashed(tmp_path):
    cfg = DataConfig(source="canvases", cache_dir=str(tmp_path / "cache"), canvases={"count": 30})
    for targets in ("boxes", "masks"):
        split = load_source(cfg, targets).splits["train"]
        assert len(split) == 30 and not any(split.near_hashes)


@pytest.mark.shared_data
@pytest.mark.skipif(not RACCOON.exists(), reason=f"needs the shared raccoon VOC archive {RACCOON}")
def test_raccoon_duplicates_are_grouped_and_their_box_conflicts_named(tmp_path):
    with tarfile.open(RACCOON) as tar:
        tar.extractall(tmp_path, filter="data")
    cfg = DataConfig(source="voc", root=str(tmp_path / "raccoon-voc"), image_size=128, channels=3)
    run_download(cfg, tmp_path / "ds", tmp_path / "holdout", task="detection", targets="boxes")
    members: dict[str, set[tuple[str, int]]] = {}
    for d in ("ds", "holdout"):
        for name, split in dataset.load(tmp_path / d).splits.items():
            for path, group in zip(split.paths, split.groups, strict=True):
                members.setdefault(group, set()).add((name, int(path.split("-")[-1].removesuffix(".jpg"))))
    groups = sorted(sorted(n for _, n in m) for m in members.values() if len(m) > 1)
    # the archive's README: byte-identical 11/116, 83/120, 52/74, 65/98; resized or captioned 21/45, 50/52/74, 51/85
    assert groups == [[11, 116], [21, 45], [50, 52, 74], [51, 85], [65, 98], [83, 120]]
    assert all(len({name for name, _ in m}) == 1 for m in members.values())  # each group in one part

    summary = run_detection_validate(tmp_path / "ds", ValidateConfig(), tmp_path / "reports")
    [warning] = [w for w in summary["warnings"] if w["column"] == "label_conflict"]
    named = {int(p.split(":")[0].split("-")[-1].removesuffix(".jpg")) for p in warning["offending"]}
    in_dataset = {n for m in members.values() if len(m) > 1 for name, n in m if name != "holdout"}
    assert named == in_dataset and all("labels differ from its duplicate" in p for p in warning["offending"])
