"""Lineage tags: what counts as a dirty tree, and how pipeline runs are named."""

import subprocess

import pytest

from visionops.tracking import lineage


def _git(root, *args):
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=root, check=True, capture_output=True)


@pytest.fixture
def repo(tmp_path):
    for rel in ("src/visionops/a.py", "reports/train/metrics.json", "dvc.lock", "params.yaml", "dvc.yaml"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text("x\n")
    _git(tmp_path, "init", "-q")
    _git(tmp_path, "add", "-A")
    _git(tmp_path, "commit", "-qm", "init")
    return tmp_path


def test_git_dirty_looks_at_sources_only(repo):
    """The pipeline rewrites its committed metrics and dvc.lock, and `dvc exp run -S` edits params.yaml
    (logged as the run's params): none of that makes the tree dirty; an edited or new source file does."""
    for rel in ("reports/train/metrics.json", "dvc.lock", "params.yaml"):
        (repo / rel).write_text("changed\n")
    (repo / "reports" / "new.png").write_text("new\n")
    assert lineage.git_info(repo)["dirty"] == "false"
    (repo / "src" / "visionops" / "b.py").write_text("new module\n")
    assert lineage.git_info(repo)["dirty"] == "true"
    (repo / "src" / "visionops" / "b.py").unlink()
    (repo / "dvc.yaml").write_text("changed\n")
    assert lineage.git_info(repo)["dirty"] == "true"


def test_pipeline_names(monkeypatch):
    monkeypatch.delenv(lineage.PIPELINE_NAME_ENV, raising=False)
    monkeypatch.delenv(lineage.DVC_EXP_NAME_ENV, raising=False)
    assert lineage.pipeline_name("0123456789ab", "false", "dvc-1-2", "train").startswith("dvc repro 0123456 20")
    assert lineage.pipeline_name("0123456789ab", "true", "single-x", "train").startswith("visionops train 0123456+ ")
    monkeypatch.setenv(lineage.DVC_EXP_NAME_ENV, "sappy-lure")
    assert lineage.experiment_name() == "sappy-lure"
    assert lineage.pipeline_name("0123456789ab", "false", "dvc-1-2", "train") == "dvc exp sappy-lure"
    monkeypatch.setenv(lineage.PIPELINE_NAME_ENV, "training · train.epochs=2")  # the Prefect flow's name wins
    assert lineage.pipeline_name("0123456789ab", "false", "prefect-1", "train") == "training · train.epochs=2"
