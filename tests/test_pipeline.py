"""The real `dvc repro` on the embedded digits data and on real CIFAR-10 JPEGs with injected faults."""

import json
import shutil

import pytest

from pipeline_project import Project

pytestmark = pytest.mark.slow


@pytest.fixture
def project(tmp_path):
    return Project(tmp_path / "proj")


def test_digits_pipeline_runs_then_is_up_to_date(project):
    first = project.repro()
    for stage in ("download", "validate", "prepare"):
        assert f"Running stage '{stage}'" in first.stdout
    summary = json.loads((project.path / "reports/validate/summary.json").read_text())
    assert summary["success"] is True
    assert (project.path / "reports/validate/data_docs/index.html").exists()
    assert (project.path / "reports/prepare/class_distribution.png").exists()
    second = project.repro()
    assert "Running stage" not in second.stdout
    assert "up to date" in second.stdout
    metrics = project.run("dvc", "metrics", "show", "--json").stdout
    assert "imbalance_ratio" in metrics


def test_changing_balance_reruns_only_prepare(project):
    project.repro()
    project.set_params(balance={"strategy": "undersample", "simulate_imbalance_factor": 5.0})
    out = project.repro().stdout
    assert "Running stage 'prepare'" in out
    assert "Running stage 'download'" not in out and "Running stage 'validate'" not in out


def test_bad_params_stop_before_any_stage_works(project):
    project.set_params(data={"image_size": -3})
    out = project.repro(check=False)
    assert out.returncode != 0
    assert "data.image_size" in out.stderr + out.stdout
    assert not (project.path / "data" / "dataset").exists()
    check = project.run("visionops", "check", check=False)
    assert check.returncode == 1 and "data.image_size" in check.stderr


@pytest.fixture
def cifar_project(project, cifar_subset):
    root = project.path.parent / "images"
    shutil.copytree(cifar_subset, root)
    project.set_params(
        data={"source": "folder", "root": str(root), "channels": 3},
        validate={"max_imbalance_ratio": 2.0},
        augment={"hflip": True},
    )
    return project, root


def test_cifar_folder_runs_all_three_stages(cifar_project):
    project, _ = cifar_project
    project.repro()
    summary = json.loads((project.path / "reports/validate/summary.json").read_text())
    assert summary["success"] is True and summary["n_classes"] == 10
    assert sum(summary["n_images"].values()) == 300


def _fails_naming(project, *names):
    out = project.repro(check=False)
    assert out.returncode != 0, out.stdout
    text = out.stdout + out.stderr
    for name in names:
        assert name in text, text[-3000:]
    assert "Running stage 'prepare'" not in out.stdout


def test_truncated_jpeg_fails_validation(cifar_project):
    project, root = cifar_project
    victim = sorted((root / "train" / "bird").iterdir())[3]
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    _fails_naming(project, str(victim))


def test_image_in_train_and_test_fails_validation(cifar_project):
    project, root = cifar_project
    (root / "test" / "frog").mkdir(parents=True)
    for cls in ("frog",):
        for f in sorted((root / "train" / cls).iterdir())[:5]:
            shutil.move(f, root / "test" / cls / f.name)
    leaked = sorted((root / "train" / "frog").iterdir())[0]
    shutil.copy(leaked, root / "test" / "frog" / "copy.jpg")
    _fails_naming(project, str(leaked), str(root / "test" / "frog" / "copy.jpg"))


def test_empty_class_folder_fails_validation(cifar_project):
    project, root = cifar_project
    for f in (root / "train" / "ship").iterdir():
        f.unlink()
    _fails_naming(project, "ship")
