import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml

from visionops import layout
from visionops.config import DataConfig, ValidateConfig
from visionops.data import dataset
from visionops.data.download import MIN_HOLDOUT, run_download
from visionops.data.images import content_hash
from visionops.data.sources import digits
from visionops.errors import ValidationFailed
from visionops.tasks.classification.validate import run_validate


def _hashes(split):
    return {content_hash(img) for img in split.images}


def test_digits_default_is_complete_stratified_and_leak_free(tmp_path):
    summary = run_download(DataConfig(), tmp_path / "ds", tmp_path / "holdout")
    ds = dataset.load(tmp_path / "ds")
    holdout = dataset.load(tmp_path / "holdout")
    assert list(holdout.splits) == ["holdout"] and holdout.class_names == ds.class_names
    parts = {**ds.splits, **holdout.splits}
    assert summary["splits"] == {name: len(split) for name, split in parts.items()}
    assert sum(summary["splits"].values()) == 1797
    assert ds.image_shape == (32, 32, 1) and ds.class_names == [str(i) for i in range(10)]
    assert holdout.image_shape == (32, 32, 1) and holdout.rejected == []
    for split in parts.values():
        assert split.images.dtype == np.uint8 and set(np.unique(split.labels)) == set(range(10))
    per_class = np.bincount(np.concatenate([s.labels for s in parts.values()]))
    for name, frac in (("holdout", 0.1), ("val", 0.1), ("test", 0.2)):
        got = np.bincount(parts[name].labels, minlength=10) / per_class
        assert np.all(np.abs(got - frac) < 4 * np.sqrt(frac * (1 - frac) / per_class)), (name, got)
    seen = set()
    for split in parts.values():
        hashes = _hashes(split)
        assert not hashes & seen
        seen |= hashes


def test_digits_source_reads_what_sklearn_load_digits_returns():
    from sklearn.datasets import load_digits

    bunch = load_digits()
    src = digits.load(DataConfig(image_size=8))
    split = src.splits["train"]
    assert src.class_names == [str(c) for c in bunch.target_names]
    assert np.array_equal(split.labels, bunch.target)
    assert np.array_equal(split.images[..., 0], np.round(bunch.images * (255.0 / 16.0)).astype(np.uint8))


def test_split_is_seeded(tmp_path):
    run_download(DataConfig(seed=1), tmp_path / "a")
    run_download(DataConfig(seed=1), tmp_path / "b")
    run_download(DataConfig(seed=2), tmp_path / "c")
    a, b, c = (dataset.load(tmp_path / n).splits["test"].paths for n in "abc")
    assert a == b and a != c


def test_digits_as_rgb_at_other_size(tmp_path):
    run_download(DataConfig(channels=3, image_size=16), tmp_path / "ds")
    assert dataset.load(tmp_path / "ds").image_shape == (16, 16, 3)


def test_folder_with_test_split_reports_bad_files(tmp_path, image_folder):
    root = tmp_path / "photos"
    for cls in ("cat", "dog"):
        files = sorted((image_folder / "train" / cls).iterdir())
        for split, chosen in (("train", files[:20]), ("test", files[20:25])):
            (root / split / cls).mkdir(parents=True)
            for f in chosen:
                shutil.copy(f, root / split / cls / f.name)
    (root / "train" / "cat" / "notes.txt").write_text("not an image")
    good = next((root / "train" / "dog").iterdir())
    (root / "train" / "dog" / "broken.jpg").write_bytes(good.read_bytes()[:200])

    summary = run_download(DataConfig(source="folder", root=str(root), channels=3, image_size=24), tmp_path / "ds")
    ds = dataset.load(tmp_path / "ds")
    assert ds.class_names == ["cat", "dog"] and ds.image_shape == (24, 24, 3)
    assert len(ds.splits["test"]) == 10 and summary["ignored_non_images"] == 1
    assert sum(summary["splits"].values()) == 50
    assert [r.path for r in ds.rejected] == ["train/dog/broken.jpg"]  # relative to data.root
    assert ds.splits["train"].orig_shapes[0] == (32, 32, 3)


def test_folder_errors_name_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="data.root"):
        run_download(DataConfig(source="folder", root=str(tmp_path / "nope")), tmp_path / "ds")
    (tmp_path / "flat").mkdir()
    (tmp_path / "flat" / "img.png").write_bytes(b"")
    with pytest.raises(ValueError, match="no class folders"):
        run_download(DataConfig(source="folder", root=str(tmp_path / "flat")), tmp_path / "ds")
    (tmp_path / "split" / "test" / "cat").mkdir(parents=True)
    with pytest.raises(ValueError, match="no train/"):
        run_download(DataConfig(source="folder", root=str(tmp_path / "split")), tmp_path / "ds")


def test_failed_download_keeps_previous_dataset(tmp_path):
    out = tmp_path / "ds"
    run_download(DataConfig(), out)
    before = (out / "meta.json").read_text()
    with pytest.raises(FileNotFoundError):
        run_download(DataConfig(source="folder", root=str(tmp_path / "missing")), out)
    assert (out / "meta.json").read_text() == before
    assert [p.name for p in tmp_path.iterdir()] == ["ds"]


def _dvc_outs(*stages: str) -> list[str]:
    """The paths DVC hashes for `stages` in the project's dvc.yaml (outs, metrics and plots)."""
    spec = yaml.safe_load((Path(__file__).parents[1] / "dvc.yaml").read_text())["stages"]
    entries = [e for s in stages for key in ("outs", "metrics", "plots") for e in spec[s].get(key, [])]
    return [e if isinstance(e, str) else next(iter(e)) for e in entries]


def test_hashed_outputs_hold_no_absolute_path(tmp_path, image_folder, monkeypatch):
    root = tmp_path / "photos"
    shutil.copytree(image_folder, root)
    (root / "train" / "cat" / "garbage.png").write_bytes(b"not an image")  # PIL names the file it cannot identify
    good = next((root / "train" / "dog").iterdir())
    (root / "train" / "dog" / "broken.jpg").write_bytes(good.read_bytes()[:200])
    project = tmp_path / "project"
    project.mkdir()
    monkeypatch.chdir(project)  # the stages' relative layout, as `dvc repro` runs them
    run_download(DataConfig(source="folder", root=str(root), channels=3, image_size=16), layout.DATASET, layout.HOLDOUT)
    with pytest.raises(ValidationFailed, match="train/cat/garbage.png"):
        run_validate(layout.DATASET, ValidateConfig(), layout.VALIDATE_REPORTS)

    outs = _dvc_outs("download", "validate")
    assert {"data/dataset", "data/holdout", "reports/validate/manifest.csv"} <= set(outs)
    files = [f for out in map(Path, outs) for f in ([out] if out.is_file() else sorted(out.rglob("*")))]
    assert Path("data/dataset/rejected.csv") in files and Path("data/holdout/holdout/manifest.csv") in files
    for f in files:
        if f.is_file():
            text = f.read_bytes()
            assert str(tmp_path).encode() not in text and str(tmp_path.resolve()).encode() not in text, f
    rejected = {r.path: r.error for r in dataset.load(layout.DATASET).rejected}
    assert set(rejected) == {"train/cat/garbage.png", "train/dog/broken.jpg"}
    assert "train/cat/garbage.png" in rejected["train/cat/garbage.png"]


def test_a_holdout_too_small_to_judge_is_warned_about(tmp_path, image_folder, capsys):
    run_download(DataConfig(), tmp_path / "digits", tmp_path / "digits-holdout")
    assert "holdout" not in capsys.readouterr().err
    assert len(dataset.load(tmp_path / "digits-holdout").splits["holdout"]) >= MIN_HOLDOUT

    cfg = DataConfig(source="folder", root=str(image_folder), channels=3, image_size=16)
    summary = run_download(cfg, tmp_path / "ds", tmp_path / "holdout")
    n = summary["splits"]["holdout"]
    assert 0 < n < MIN_HOLDOUT
    assert f"download: warning: the holdout has {n} images" in capsys.readouterr().err
