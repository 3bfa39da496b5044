"""The `validate` stage on small canonical datasets, with real Great Expectations."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from visionops.config import ValidateConfig
from visionops.data.dataset import Dataset, Rejected, Split, save
from visionops.errors import ValidationFailed
from visionops.tasks.classification.validate import run_validate

CLASSES = ["cat", "dog", "frog"]
SHAPE = (8, 8, 3)


def make_split(name: str, counts: list[int], rng: np.random.Generator, root: str = "/src") -> Split:
    """Random (never blank) images; paths `<root>/<split>/<class>/<i>.png`."""
    labels = np.concatenate([np.full(n, k, dtype=np.int64) for k, n in enumerate(counts)])
    images = rng.integers(0, 256, size=(len(labels), *SHAPE), dtype=np.uint8)
    paths = [f"{root}/{name}/{CLASSES[y]}/{i}.png" for i, y in enumerate(labels)]
    return Split(images, labels, paths, [(20, 24, 3)] * len(labels))


def make_dataset(train=(8, 8, 8), val=(2, 2, 2), test=(3, 3, 3), seed=0, source="synthetic", root="/src") -> Dataset:
    rng = np.random.default_rng(seed)
    splits = {name: make_split(name, list(c), rng, root) for name, c in (("train", train), ("val", val), ("test", test))}
    return Dataset(list(CLASSES), splits, source)


def validate(tmp_path: Path, ds: Dataset, cfg: ValidateConfig | None = None) -> tuple[dict, Path]:
    save(ds, tmp_path / "dataset")
    out = tmp_path / "out"
    return run_validate(tmp_path / "dataset", cfg or ValidateConfig(), out), out


def failing(tmp_path: Path, ds: Dataset, cfg: ValidateConfig | None = None) -> tuple[ValidationFailed, Path]:
    save(ds, tmp_path / "dataset")
    out = tmp_path / "out"
    with pytest.raises(ValidationFailed) as info:
        run_validate(tmp_path / "dataset", cfg or ValidateConfig(), out)
    # every output is written even on failure, and summary.json matches the exception's summary
    summary = json.loads((out / "summary.json").read_text())
    assert summary["success"] is False and summary == info.value.summary
    assert (out / "manifest.csv").exists() and (out / "class_counts.csv").exists()
    assert (out / "data_docs" / "index.html").exists()
    return info.value, out


def failure_for(summary: dict, column: str) -> dict:
    matches = [f for f in summary["critical_failures"] if f["column"] == column]
    assert matches, f"no critical failure on {column}: {summary['critical_failures']}"
    return matches[0]


def test_relative_paths_as_dvc_gives_them(tmp_path, monkeypatch):
    """The stage runs as `visionops validate` from the project root, with relative paths."""
    save(make_dataset(), tmp_path / "data" / "dataset")
    monkeypatch.chdir(tmp_path)
    summary = run_validate(Path("data/dataset"), ValidateConfig(), Path("reports/validate"))
    on_disk = json.loads((tmp_path / "reports/validate/summary.json").read_text())
    assert summary["success"] and on_disk["dataset"] == "data/dataset"  # no absolute path in a file DVC hashes
    assert (tmp_path / "reports/validate/data_docs/index.html").exists()


def test_clean_dataset_passes_and_writes_outputs(tmp_path):
    summary, out = validate(tmp_path, make_dataset())
    assert summary["success"] is True
    assert summary["critical_failures"] == [] and summary["warnings"] == []
    on_disk = json.loads((out / "summary.json").read_text())
    assert on_disk["success"] is True
    assert on_disk["n_images"] == {"train": 24, "val": 6, "test": 9}
    assert on_disk["n_classes"] == 3
    assert on_disk["imbalance_ratio"] == 1.0
    assert on_disk["class_counts"]["train"] == {"cat": 8, "dog": 8, "frog": 8}
    assert isinstance(summary["seconds"], float)  # timings go to MLflow, never into a file DVC hashes
    assert "seconds" not in on_disk and "manifest_seconds" not in on_disk and on_disk["dataset"] == str(tmp_path / "dataset")
    assert (out / "data_docs" / "index.html").exists()

    manifest = pd.read_csv(out / "manifest.csv")
    assert len(manifest) == 39
    for col in ["split", "label", "class_name", "path", "height", "width", "channels", "orig_height",
                "orig_width", "orig_channels", "pixel_mean", "pixel_std", "content_hash", "readable",
                "leaks_across_splits"]:  # fmt: skip
        assert col in manifest.columns
    assert manifest["readable"].all() and not manifest["leaks_across_splits"].any()
    assert set(manifest["height"]) == {8} and set(manifest["orig_width"]) == {24}
    assert manifest["content_hash"].is_unique

    counts = pd.read_csv(out / "class_counts.csv")
    assert list(counts.columns) == ["split", "class_name", "count"]
    assert len(counts) == 9 and counts["count"].sum() == 39


def test_image_duplicated_across_train_and_test_fails_naming_both(tmp_path):
    ds = make_dataset()
    ds.splits["test"].images[4] = ds.splits["train"].images[7]
    train_path, test_path = ds.splits["train"].paths[7], ds.splits["test"].paths[4]
    exc, _ = failing(tmp_path, ds)
    leak = failure_for(exc.summary, "leaks_across_splits")
    assert sorted(leak["offending"]) == sorted([train_path, test_path]) and leak["n_offending"] == 2
    assert train_path in exc.message and test_path in exc.message
    # only the leak fails
    assert [f["column"] for f in exc.summary["critical_failures"]] == ["leaks_across_splits"]


def test_val_test_leak_is_flagged(tmp_path):
    ds = make_dataset()
    ds.splits["val"].images[1] = ds.splits["test"].images[2]
    exc, _ = failing(tmp_path, ds)
    leak = failure_for(exc.summary, "leaks_across_splits")
    assert set(leak["offending"]) == {ds.splits["val"].paths[1], ds.splits["test"].paths[2]}


def test_rejected_file_fails_naming_it(tmp_path):
    ds = make_dataset()
    ds.rejected = [Rejected("train", 1, "/src/train/dog/broken.png", "OSError: image file is truncated")]
    exc, out = failing(tmp_path, ds)
    readable = failure_for(exc.summary, "readable")
    assert readable["offending"] == ["/src/train/dog/broken.png"]
    assert "/src/train/dog/broken.png" in exc.message
    assert [f["column"] for f in exc.summary["critical_failures"]] == ["readable"]
    manifest = pd.read_csv(out / "manifest.csv")
    row = manifest[manifest["path"] == "/src/train/dog/broken.png"].iloc[0]
    assert not row["readable"] and np.isnan(row["pixel_mean"]) and "truncated" in row["error"]


def test_empty_class_fails_naming_it(tmp_path):
    exc, _ = failing(tmp_path, make_dataset(train=(8, 0, 8)))
    empty = failure_for(exc.summary, "count")
    assert empty["offending"] == ["dog"]
    assert "dog" in exc.message and "empty class" in exc.message
    assert exc.summary["imbalance_ratio"] is None
    assert exc.summary["class_counts"]["train"]["dog"] == 0


def test_empty_class_of_folder_source_names_the_class_folder(tmp_path):
    ds = make_dataset(train=(8, 8, 0), source="folder")
    for split in ds.splits.values():  # the folder source names its files relative to data.root
        split.paths = [p.removeprefix("/src/") for p in split.paths]
    exc, _ = failing(tmp_path, ds)
    assert failure_for(exc.summary, "count")["offending"] == ["train/frog"]
    assert "train/frog" in exc.message and "hashed to val, test or holdout" in exc.message


def test_blank_image_fails_pixel_checks_naming_it(tmp_path):
    ds = make_dataset()
    ds.splits["val"].images[3] = 0
    blank = ds.splits["val"].paths[3]
    exc, _ = failing(tmp_path, ds)
    assert failure_for(exc.summary, "pixel_mean")["offending"] == [blank]
    assert failure_for(exc.summary, "pixel_std")["offending"] == [blank]
    assert blank in exc.message


def test_constant_grey_image_fails_std_check(tmp_path):
    ds = make_dataset()
    ds.splits["train"].images[0] = 128
    exc, _ = failing(tmp_path, ds)
    assert [f["column"] for f in exc.summary["critical_failures"]] == ["pixel_std"]
    assert failure_for(exc.summary, "pixel_std")["offending"] == [ds.splits["train"].paths[0]]


def test_label_out_of_range_fails(tmp_path):
    ds = make_dataset()
    ds.splits["train"].labels[5] = 3  # three classes: 0..2
    bad = ds.splits["train"].paths[5]
    exc, _ = failing(tmp_path, ds)
    label = failure_for(exc.summary, "label")
    assert label["offending"] == [bad] and label["n_offending"] == 1
    assert bad in exc.message and "label in 0..2" in exc.message


def test_inconsistent_image_shape_fails(tmp_path):
    ds = make_dataset()
    test = ds.splits["test"]
    ds.splits["test"] = Split(np.repeat(np.repeat(test.images, 2, axis=1), 2, axis=2), test.labels, test.paths)
    exc, _ = failing(tmp_path, ds)
    assert {f["column"] for f in exc.summary["critical_failures"]} == {"height", "width"}
    assert failure_for(exc.summary, "height")["n_offending"] == len(test)


def test_imbalance_is_a_warning_only(tmp_path):
    summary, out = validate(tmp_path, make_dataset(train=(30, 2, 6)), ValidateConfig(max_imbalance_ratio=5.0))
    assert summary["success"] is True and summary["critical_failures"] == []
    assert summary["imbalance_ratio"] == 15.0
    (warning,) = summary["warnings"]
    assert warning["column"] == "ratio_to_smallest" and warning["offending"] == ["cat"]
    assert json.loads((out / "summary.json").read_text())["warnings"] == summary["warnings"]


def test_many_offenders_are_truncated(tmp_path):
    ds = make_dataset(train=(20, 20, 20))
    ds.splits["train"].images[:25] = 0
    exc, _ = failing(tmp_path, ds)
    std = failure_for(exc.summary, "pixel_std")
    assert std["n_offending"] == 25 and len(std["offending"]) == 20
    assert "and 15 more" in exc.message
