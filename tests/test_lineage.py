"""Lineage tags: what counts as a dirty tree, and how pipeline runs are named."""

import contextlib
import fcntl
import os
import pty
import struct
import subprocess
import sys
import termios
from pathlib import Path

import pytest
import yaml

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


def test_pipeline_names(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)  # no params.yaml edited against a commit here: an experiment overrides nothing
    monkeypatch.delenv(lineage.PIPELINE_NAME_ENV, raising=False)
    monkeypatch.delenv(lineage.DVC_EXP_NAME_ENV, raising=False)
    assert lineage.pipeline_name("0123456789ab", "false", "dvc-1-2", "train").startswith("dvc repro 0123456 20")
    assert lineage.pipeline_name("0123456789ab", "true", "single-x", "train").startswith("visionops train 0123456+ ")
    monkeypatch.setenv(lineage.DVC_EXP_NAME_ENV, "sappy-lure")
    assert lineage.experiment_name() == "sappy-lure"
    assert lineage.pipeline_name("0123456789ab", "false", "dvc-1-2", "train") == "dvc exp sappy-lure"
    monkeypatch.setenv(lineage.PIPELINE_NAME_ENV, "training · train.epochs=2")  # the Prefect flow's name wins
    assert lineage.pipeline_name("0123456789ab", "false", "prefect-1", "train") == "training · train.epochs=2"


def test_an_experiment_is_named_with_the_params_it_overrides(repo, monkeypatch):
    """`dvc exp run -S train.epochs=2` edits params.yaml: the runs are named `<exp> train.epochs=2`."""
    params = {"train": {"epochs": 10, "lr": 0.05, "device": "auto"}, "distill": {"baseline": True, "init": None}}
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    _git(repo, "commit", "-qam", "params")
    monkeypatch.chdir(repo)
    monkeypatch.delenv(lineage.PIPELINE_NAME_ENV, raising=False)
    monkeypatch.setenv(lineage.DVC_EXP_NAME_ENV, "hempy-mate")
    assert lineage.param_overrides() == [] and lineage.experiment_label() == "hempy-mate"
    params["train"].update(epochs=2, device="cpu")
    params["distill"].update(baseline=False, init=[1, 2])
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    overrides = "train.epochs=2 train.device=cpu distill.baseline=false distill.init=[1,2]"
    assert lineage.experiment_label() == f"hempy-mate {overrides}"
    assert lineage.pipeline_name("0123456789ab", "false", "dvc-1-2", "train") == f"dvc exp hempy-mate {overrides}"
    params["train"].update({f"extra_{i}": i for i in range(40)})  # a preset copied over params.yaml: cut to fit
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    label = lineage.experiment_label()
    assert len(label) == lineage.LABEL_CHARS and label.startswith("hempy-mate train.epochs=2 train.device=cpu train.extra_0=0")
    assert label.endswith("…")
    monkeypatch.delenv(lineage.DVC_EXP_NAME_ENV)
    assert lineage.experiment_label() is None  # `dvc repro` on edited params: named by commit and time, as before


def _on_a_terminal(code: str, cwd) -> str:
    """What `python -c code` writes to a 200-column terminal (a pseudo-terminal: progress bars draw as for a user)."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 50, 200, 0, 0))
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src"), "DVC_NO_ANALYTICS": "1"}
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=slave, stderr=slave)
    os.close(slave)
    out = b""
    with contextlib.suppress(OSError):  # EIO once the process has closed the terminal
        while chunk := os.read(master, 65536):
            out += chunk
    os.close(master)
    assert proc.wait() == 0, out.decode(errors="replace")
    return out.decode(errors="replace")


def test_dvc_dep_hashes_draw_no_progress_bars(repo):
    """DVC would draw a "Collecting files and computing hashes" bar per dependency on the stage's terminal."""
    (repo / "data" / "dataset").mkdir(parents=True)
    for i in range(3):
        (repo / "data" / "dataset" / f"{i}.txt").write_text(f"{i}\n")
    (repo / "dvc.lock").unlink()  # the fixture's are no lock and no params file
    (repo / "params.yaml").write_text("train: {epochs: 1}\n")
    deps = ["data/dataset", "reports/train/metrics.json", "src/visionops/a.py"]
    (repo / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"s": {"cmd": "true", "deps": deps}}}))
    subprocess.run([sys.executable, "-m", "dvc", "init", "-q"], cwd=repo, check=True, env={**os.environ, "DVC_NO_ANALYTICS": "1"})
    code = "from pathlib import Path; from visionops.tracking import lineage; print(sorted(lineage.dvc_dep_hashes(Path('.'), 's')))"
    out = _on_a_terminal(code, repo)
    assert str(sorted(deps)) in out
    assert "Collecting files" not in out and "computing hashes" not in out, out
