"""A fresh clone's `make run` registers the models and makes a champion, whatever DVC's lock says: the
registry is state DVC cannot see, so the register stage is always_changed and asks the registry itself.

The clone is of this repository's committed HEAD (commit first: uncommitted changes are not in it), in
tmp_path; `make -o setup run` uses this interpreter's virtualenv (no install) and the clone's own src/."""

from __future__ import annotations

import base64
import csv
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from visionops.data import dataset
from visionops.serving.pyfunc import encode_png

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
VENV = Path(sys.prefix)
TEACHER = "visionops-classifier"


def _env(clone: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "VIRTUAL_ENV", "DVC_EXP_NAME")}
    return {**env, "PATH": f"{VENV / 'bin'}{os.pathsep}{env['PATH']}", "PYTHONPATH": str(clone / "src"),
            "DVC_NO_ANALYTICS": "1", "GX_ANALYTICS_ENABLED": "false"}


def _run(clone: Path, *cmd: str) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=clone, env=_env(clone), capture_output=True, text=True, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return proc


def _make_run(clone: Path) -> str:
    return _run(clone, "make", "-o", "setup", "run", f"VENV={VENV}").stdout


def _versions(clone: Path) -> list[tuple[str, str]]:
    client = MlflowClient(tracking_uri=f"sqlite:///{clone / 'mlflow.db'}")
    return sorted((v.name, str(v.version)) for v in client.search_model_versions(""))


def _predict(clone: Path) -> dict:
    """`visionops predict` on one holdout image, as a user would: the champion's answer, from the CSV."""
    held = dataset.load(clone / "data" / "holdout").splits["holdout"]
    image = clone / "incoming.png"
    image.write_bytes(base64.b64decode(encode_png(np.asarray(held.images[0]))))
    out = _run(clone, "visionops", "predict", str(image), "--out", str(clone / "predictions.csv")).stdout
    assert f"with models:/{TEACHER}@champion" in out, out
    (row,) = csv.DictReader((clone / "predictions.csv").open())
    return row


def test_a_fresh_clone_registers_a_champion_and_a_second_make_run_registers_nothing(tmp_path):
    clone = tmp_path / "clone" / "visionops"
    subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True)
    where = _run(clone, "python", "-c", "import visionops; print(visionops.__file__)").stdout.strip()
    assert Path(where).resolve().is_relative_to(clone.resolve()), where  # the clone's code, not the installed one

    first = _make_run(clone)
    assert "Running stage 'register'" in first
    row = _predict(clone)
    assert row["error"] == "" and row["label"] in [str(d) for d in range(10)] and 0 < float(row["probability"]) <= 1
    versions = _versions(clone)
    assert {name for name, _ in versions} == {TEACHER, "visionops-student"}

    second = _make_run(clone)  # every stage up to date; register asks the registry and finds nothing to do
    assert "register: nothing to register: the model files are registered already as" in second, second
    assert [line for line in second.splitlines() if line.startswith("Running stage")] == [
        "Running stage 'resolve_init':", "Running stage 'register':"]  # the always_changed stages
    assert _versions(clone) == versions
    from pipelines.nothing_to_do import nothing_to_do  # `python -m pipelines training`: no flow run needed either

    said = nothing_to_do(clone, promote=False, env={})
    assert said.startswith("nothing to do: `dvc status` says every stage is up to date (register, which DVC always "
                           "reruns, would find every model file registered)"), said

    # the state on any machine: every output equals dvc.lock, and the registry is empty
    (clone / "mlflow.db").unlink()
    shutil.rmtree(clone / "mlartifacts")
    assert nothing_to_do(clone, promote=False, env={}) is None  # the register stage has work: the flow runs
    third = _make_run(clone)
    assert f"{TEACHER} v1: registered; champion after the gates" in third, third
    assert _predict(clone)["label"] == row["label"]
    assert _versions(clone) == [(TEACHER, "1"), ("visionops-student", "1")]
