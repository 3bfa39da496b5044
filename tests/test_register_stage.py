"""`visionops register`: the one step that registers the teacher and the student (train and distill
only write files), idempotent by the model file's hash, with the first promotion judging the version
it just registered. Real CLI, real MLflow SQLite store, real (tiny) trained models."""

from __future__ import annotations

import base64
import csv
import json
import re
import os
import shutil
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient
from mlflow.tracking._model_registry import utils as registry_utils
from mlflow.tracking._tracking_service import utils as tracking_utils

from visionops import layout
from visionops.cli import main
from visionops.data import dataset
from visionops.serving.pyfunc import encode_png
from visionops.tasks.classification import classifier

ROOT = Path(__file__).resolve().parents[1]
NAMES = ["a", "b", "c"]
SHAPE = (16, 16, 1)
TEACHER, STUDENT = "reg-teacher", "reg-student"


def _images(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    x = rng.integers(0, 60, (len(labels), *SHAPE), dtype=np.uint8)
    for i, k in enumerate(labels):
        region = [(slice(0, 8), slice(0, 8)), (slice(0, 8), slice(8, 16)), (slice(8, 16), slice(0, 16))][k]
        x[i][region] = rng.integers(150, 256, x[i][region].shape, dtype=np.uint8)
    return x


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> dict[str, Path]:
    """A holdout dataset and three model files: two good ones (teacher, student) and another student."""
    rng = np.random.default_rng(0)
    out = tmp_path_factory.mktemp("register-assets")
    labels = np.arange(60) % 3
    held = dataset.Split(_images(labels, rng), labels, [f"holdout/{i}.png" for i in range(60)])
    # one frozen set of images, under both names the promotion code has used for it
    dataset.save(dataset.Dataset(NAMES, {"holdout": held, "test": held}, "synthetic"), out / "holdout")
    val = dataset.Split(_images(labels[:30], rng), labels[:30], [f"val/{i}.png" for i in range(30)])
    dataset.save(dataset.Dataset(NAMES, {"val": val}, "synthetic"), out / "dataset")  # register's reference profile
    train_labels = np.arange(240) % 3
    x = torch.from_numpy(_images(train_labels, rng)).permute(0, 3, 1, 2)
    y = torch.from_numpy(train_labels)
    paths = {"holdout": out / "holdout", "dataset": out / "dataset"}
    for name, (seed, steps) in {"teacher": (0, 40), "student": (1, 40), "student2": (2, 40)}.items():
        torch.manual_seed(seed)
        model = classifier.build("lenet", NAMES, SHAPE, [0.3], [0.3])
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        for _ in range(steps):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
        paths[name] = out / f"{name}.pt"
        classifier.save(paths[name], model.eval(), "lenet", NAMES, SHAPE)
    return paths


@pytest.fixture
def project(tmp_path, assets, monkeypatch) -> Path:
    """A project folder (params.yaml, models/, data/holdout, data/dataset) with its own MLflow store; cwd is inside it."""
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["mlflow"].update(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}", teacher_model_name=TEACHER,
                            student_model_name=STUDENT)  # fmt: skip
    params["promote"].update(min_score=0.9, min_class_score=0.5, max_ece=1.0, max_latency_ratio=1000.0)
    params["evaluate"]["latency_batch_size"] = 4
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    (tmp_path / "models").mkdir()
    shutil.copy(assets["teacher"], tmp_path / layout.TEACHER)
    shutil.copy(assets["student"], tmp_path / layout.STUDENT)
    shutil.copytree(assets["holdout"], tmp_path / layout.HOLDOUT)
    shutil.copytree(assets["dataset"], tmp_path / layout.DATASET)
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_REGISTRY_URI", raising=False)
    monkeypatch.setattr(registry_utils, "_registry_uri", None)
    old = tracking_utils._tracking_uri
    yield tmp_path
    mlflow.end_run()
    mlflow.set_tracking_uri(old)


def _register(capsys) -> dict:
    assert main(["register", "--json"]) == 0, capsys.readouterr().err
    return json.loads(capsys.readouterr().out)


def _versions(client: MlflowClient, name: str) -> list[str]:
    return sorted(str(v.version) for v in client.search_model_versions(f"name = '{name}'"))


def test_register_is_one_idempotent_step_and_first_promotion_judges_the_new_version(project, assets, capsys):
    first = _register(capsys)
    client = MlflowClient()
    teacher, student = first["registered"]
    assert (teacher["name"], teacher["version"], teacher["created"]) == (TEACHER, "1", True)
    assert (student["name"], student["version"], student["created"]) == (STUDENT, "1", True)
    assert teacher["promotion"]["promoted"] and teacher["promotion"]["challenger_version"] == "1"
    assert student["promotion"]["challenger_version"] == "1"
    assert client.get_registered_model(TEACHER).aliases == {"champion": 1}
    mv = client.get_model_version(STUDENT, "1")
    assert mv.tags["visionops.teacher_version"] == "1" and mv.tags["visionops.stage"] == "register"
    run = client.get_run(mv.run_id)  # registered inside the register stage's own tracked run
    assert run.data.tags["visionops.stage"] == "register" and run.info.status == "FINISHED"
    assert run.data.params["promote.min_score"] == "0.9" and run.data.metrics["new_versions"] == 2
    description = client.get_model_version(TEACHER, "1").description

    runs = len(mlflow.search_runs(search_all_experiments=True))
    again = _register(capsys)  # a rerun (every `dvc repro`: the stage is always_changed) registers and judges nothing
    assert [(r["version"], r["created"], "promotion" in r) for r in again["registered"]] == [("1", False, False)] * 2
    assert _versions(client, TEACHER) == ["1"] and _versions(client, STUDENT) == ["1"]
    assert client.get_model_version(TEACHER, "1").description == description
    assert main(["register"]) == 0
    (line,) = capsys.readouterr().out.splitlines()  # one short line, and no MLflow run opened for nothing
    assert line.startswith(f"register: nothing to register: the model files are registered already as {TEACHER} v1 (champion)")
    assert len(mlflow.search_runs(search_all_experiments=True)) == runs

    shutil.copy(assets["student2"], project / layout.STUDENT)  # a retrained student: one new version
    third = _register(capsys)
    assert [(r["version"], r["created"]) for r in third["registered"]] == [("1", False), ("2", True)]
    assert "promotion" not in third["registered"][1]  # there is a champion: `visionops promote` decides
    assert str(client.get_registered_model(STUDENT).aliases["challenger"]) == "2"
    assert client.get_model_version(STUDENT, "2").tags["visionops.teacher_version"] == "1"


def test_register_names_a_missing_model_file(project, capsys):
    (project / layout.STUDENT).unlink()
    assert main(["register"]) == 1
    assert "models/student.pt: no model file to register" in capsys.readouterr().err


def test_register_with_tracking_off_registers_nothing(project, capsys):
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["mlflow"]["enabled"] = False
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    assert _register(capsys)["registered"] == []
    assert not (project / "mlflow.db").exists()


def test_predict_writes_every_row_then_fails_when_a_file_failed(project, capsys):
    _register(capsys)
    ds = dataset.load(project / layout.HOLDOUT)
    folder = project / "incoming"
    folder.mkdir()
    for i in range(3):
        (folder / f"{i}.png").write_bytes(base64.b64decode(encode_png(np.asarray(ds.splits["holdout"].images[i]))))
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    out = project / "predictions.csv"
    assert main(["predict", str(folder), "--model", f"models:/{TEACHER}@champion", "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert f"visionops predict: error: 1 of 4 files could not be predicted; see the error column of {out}" in err
    rows = {Path(r["path"]).name: r for r in csv.DictReader(out.open())}
    assert set(rows) == {"0.png", "1.png", "2.png", "broken.png"}
    assert rows["broken.png"]["label"] == "" and rows["broken.png"]["error"].startswith("cannot decode image bytes")
    assert all(rows[f"{i}.png"]["label"] == NAMES[ds.splits["holdout"].labels[i]] for i in range(3))
    (folder / "broken.png").unlink()
    assert main(["predict", str(folder), "--model", f"models:/{TEACHER}@champion", "--out", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["images"] == 3


def test_register_in_a_dvc_experiment_moves_no_alias_then_the_main_line_takes_its_version(project, capsys, monkeypatch):
    """Under `dvc exp run` (DVC_EXP_NAME) register tags its versions with the experiment and moves no alias,
    not even a first champion; the main pipeline registering the same file makes that version its challenger."""
    monkeypatch.setenv("DVC_EXP_NAME", "sappy-lure")
    exp = _register(capsys)
    client = MlflowClient()
    assert exp["experiment"] == "sappy-lure"
    assert [(r["version"], r["created"], "promotion" in r) for r in exp["registered"]] == [("1", True, False)] * 2
    for name in (TEACHER, STUDENT):
        assert client.get_registered_model(name).aliases == {}
        mv = client.get_model_version(name, "1")
        assert mv.tags["visionops.experiment"] == "sappy-lure" and "promotion.decision" not in mv.tags
        assert client.get_run(mv.run_id).data.tags["visionops.experiment"] == "sappy-lure"

    monkeypatch.delenv("DVC_EXP_NAME")
    main_line = _register(capsys)  # e.g. `dvc repro -f register` after `dvc exp apply`
    assert [(r["version"], r["created"]) for r in main_line["registered"]] == [("1", False)] * 2
    assert main_line["registered"][0]["promotion"]["promoted"]  # the first promotion judges it now
    assert client.get_registered_model(TEACHER).aliases == {"champion": 1}


def _untrained_teacher(project: Path) -> None:
    torch.manual_seed(0)
    classifier.save(project / layout.TEACHER, classifier.build("lenet", NAMES, SHAPE, [0.3], [0.3]).eval(), "lenet",
                    NAMES, SHAPE)


def test_register_prints_why_a_first_version_is_not_champion(project, capsys):
    _untrained_teacher(project)
    assert main(["register"]) == 0
    teacher, student = capsys.readouterr().out.splitlines()
    assert re.fullmatch(rf"{TEACHER} v1: registered; not champion after the gates: accuracy 0\.\d+ vs min_score 0\.9000 "
                        r"\(set promote\.min_score in params\.yaml\)"
                        r"(; class recall below min_class_score 0\.500: .* \(set promote\.min_class_score in params\.yaml\))?",
                        teacher), teacher
    assert student == f"{STUDENT} v1: registered; champion after the gates"
    assert main(["register"]) == 0  # judged once: a rerun registers and judges nothing
    assert capsys.readouterr().out.startswith("register: nothing to register")



def test_register_names_the_auto_gate_that_refused_and_its_keys(project, capsys):
    """Under the shipped `auto` floors an untrained teacher does no better than always answering the holdout's
    most frequent class: the line names the gate, the score, the floor, how it was set and the keys to change."""
    params = yaml.safe_load(Path("params.yaml").read_text())
    params["promote"].update(min_score="auto", min_class_score="auto", auto_margin=0.25)
    Path("params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    _untrained_teacher(project)
    assert main(["register"]) == 0
    teacher = capsys.readouterr().out.splitlines()[0]
    assert re.fullmatch(rf"{TEACHER} v1: registered; not champion after the gates: accuracy 0\.\d+ vs min_score auto "
                        r"0\.\d+ \(the most frequent class scores 0\.\d+ on this holdout, \+ auto_margin 0\.25 of the gap to 1\) "
                        r"\(set promote\.min_score, or promote\.auto_margin, in params\.yaml\)(; class recall below "
                        r"min_class_score auto .*\(set promote\.min_class_score, or promote\.auto_margin, in params\.yaml\))?",
                        teacher), teacher


def test_missing_champion_messages_say_what_helps(project, capsys):
    """They suggested `dvc repro` and `visionops promote --version N`, which both failed in a fresh clone."""
    image = project / "one.png"
    image.write_bytes(base64.b64decode(encode_png(np.asarray(dataset.load(project / layout.HOLDOUT).splits["holdout"].images[0]))))
    assert main(["predict", str(image)]) == 1
    err = capsys.readouterr().err.splitlines()[-1]  # (after MLflow's log lines as it creates the store)
    assert err == (f"visionops predict: error: no model named '{TEACHER}' is registered yet: run `dvc repro` (or `make run`): "
                   "its register stage registers the trained models and makes the first version that passes the promotion "
                   "gates champion")
    assert main(["promote"]) == 1
    assert f"no version of '{TEACHER}' is registered yet: run `dvc repro`" in capsys.readouterr().err

    _untrained_teacher(project)
    _register(capsys)  # v1 is judged and rejected: `dvc repro` again would change nothing
    assert main(["predict", str(image)]) == 1
    err = capsys.readouterr().err.splitlines()[-1]
    assert re.fullmatch(rf"visionops predict: error: model '{TEACHER}' has no champion: version 1 is registered, and v1, "
                        r"the newest judged, was rejected by the promotion gates \(accuracy 0\.\d+ vs min_score 0\.9000.*\): "
                        r"train a better model \(`dvc repro` registers and judges it\), or judge a version again under "
                        r"other params.yaml `promote` gates with `visionops promote --version N`", err), err


class _Payload:  # pickled by reference: loading it would import and call code
    def __reduce__(self):
        return (print, ("this ran",))


def test_a_model_file_holding_code_is_refused_in_one_line(project, capsys):
    torch.save({"task": "classification", "state_dict": {}, "extra": _Payload()}, project / layout.TEACHER)
    assert main(["register"]) == 1
    out, err = capsys.readouterr()
    assert "this ran" not in out + err and "Traceback" not in err
    assert err.splitlines()[-1] == ("visionops register: error: models/teacher.pt: refused: it holds code (the pickled global print), "
                   "and visionops loads only tensors and plain values (torch.load weights_only); retrain it with "
                   "`visionops train`")


def test_a_training_checkpoint_holding_code_is_refused_in_one_line(tmp_path):
    from visionops.errors import InvalidInputError
    from visionops.training.trainer import _load_checkpoint

    torch.save({"fingerprint": "f", "extra": _Payload()}, tmp_path / "train.pt")
    with pytest.raises(InvalidInputError) as err:
        _load_checkpoint(tmp_path / "train.pt", "f", None, None, None, None)  # refused before anything is restored
    assert str(err.value) == (f"{tmp_path / 'train.pt'}: refused: it holds code (the pickled global print), and visionops "
                              "loads only tensors and plain values (torch.load weights_only); delete it to train from the start")
CHATTER = (" INFO ", "Creating initial MLflow database tables", "Downloading artifacts", "Successfully registered model",
           "Created version")


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """The real command line, its stdout and stderr in one piped stream (as in `dvc repro`'s output)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env["PYTHONPATH"] = str(ROOT / "src")
    return subprocess.run([sys.executable, "-m", "visionops", *args], cwd=cwd, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)


def test_register_and_predict_print_their_own_lines_only(project):
    """No MLflow INFO lines, prints or download bars on a new store; predict's progress bar stays off when piped."""
    out = _cli("register", cwd=project)
    assert out.returncode == 0, out.stdout
    assert f"{TEACHER} v1: registered; champion after the gates" in out.stdout
    assert not [c for c in CHATTER if c in out.stdout], out.stdout
    folder = project / "incoming"
    folder.mkdir()
    held = dataset.load(project / layout.HOLDOUT).splits["holdout"]
    for i in range(3):
        (folder / f"{i}.png").write_bytes(base64.b64decode(encode_png(np.asarray(held.images[i]))))
    out = _cli("predict", str(folder), "--model", f"models:/{TEACHER}@champion", cwd=project)
    assert out.returncode == 0, out.stdout
    assert out.stdout == f"predicted 3 images with models:/{TEACHER}@champion; wrote predictions.csv\n"


def test_predict_on_a_new_store_prints_its_error_alone(project):
    out = _cli("predict", "a.png", cwd=project)
    assert out.returncode == 1 and (project / "mlflow.db").exists()  # the store was created, silently
    assert out.stdout.startswith(f"visionops predict: error: no model named '{TEACHER}' is registered yet")
    assert len(out.stdout.splitlines()) == 1, out.stdout
