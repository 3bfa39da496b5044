"""The Prefect flows on the real DVC pipeline (tiny digits runs), and the nightly deployment on a real server.

Flows run in-process against Prefect's test harness; every DVC stage is a real `dvc repro --single-item`
in a throwaway git+DVC copy of the project (tests/pipeline_project.Project), with a real MLflow store.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import psutil
import pytest
import yaml
from pipeline_project import Project

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from pipelines import dvc_stages, flows
from visionops.tracking import faults

STAGES = ["download", "validate", "label_issues", "prepare", "pretrain", "resolve_init", "train", "evaluate", "baseline",
          "distill", "register"]
WITH_RUNS = [s for s in STAGES if s not in ("pretrain", "resolve_init")]  # the stages with an MLflow run (pretrain disabled
# opens none; resolve_init only writes a file)
ALWAYS_RUN = ("resolve_init", "register")  # always_changed: DVC runs them on every `dvc repro`
# tests/test_pipeline.py's FAST, with a LeNet teacher that reaches ~98% holdout accuracy in seconds, so it
# passes the promotion gates and becomes the champion the monitoring tests watch.
FAST = {
    "train": {"model": "lenet", "epochs": 40, "optimizer": "adamw", "lr": 0.003},
    "distill": {"epochs": 1, "baseline": False},
    "evaluate": {"gradcam_samples": 2},
    "promote": {"min_score": 0.9, "min_class_score": 0.8},  # fixed floors: the 1-epoch student stays a rejected challenger
}


# ------------------------------------------------------------------------------------------
# fixtures and helpers


@pytest.fixture
def no_retry_delays(monkeypatch):
    monkeypatch.setattr(flows, "DOWNLOAD_BACKOFF_S", 0.0)
    monkeypatch.setattr(flows, "STAGE_RETRY_DELAY_S", 0.0)


def _commit(project: Project, message: str) -> None:
    project.run("git", "add", "-A")
    project.run("git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", message, check=False)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, prefect_harness):
    """One training flow run of the whole pipeline; later tests build on this project."""
    project = Project(tmp_path_factory.mktemp("flows") / "proj")
    project.set_params(**FAST)
    _commit(project, "fast params")
    project.state = flows.training(project_dir=str(project.path), return_state=True)
    return project


def _flow_run_id(state) -> str:
    return str(state.state_details.flow_run_id)


def _task_runs(flow_run_id: str) -> list:
    """The flow run's task runs, in the order they started."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    return sorted(runs, key=lambda r: (r.start_time or r.expected_start_time or r.created))


def _artifact(flow_run_id: str, key: str):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        ArtifactFilter,
        ArtifactFilterKey,
        FlowRunFilter,
        FlowRunFilterId,
    )

    with get_client(sync_client=True) as client:
        found = client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])),
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])),
        )
    assert found, f"no artifact {key!r} for flow run {flow_run_id}"
    return found[0]


def _mlflow_runs(project: Project, **tags: str) -> list:
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{project.path / 'mlflow.db'}")
    where = " and ".join(f"tags.`{k}` = '{v}'" for k, v in tags.items())
    experiments = [e.experiment_id for e in client.search_experiments()]
    return client.search_runs(experiments, where)


# ------------------------------------------------------------------------------------------
# fast unit tests


def test_stage_order_is_topological_and_stable(tmp_path):
    assert dvc_stages.stage_order(ROOT) == STAGES
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump({"stages": {
        "report": {"cmd": "x", "deps": ["out/b", "out/a.txt"]},
        "b": {"cmd": "x", "deps": ["data"], "outs": [{"out/b": {"cache": False}}]},
        "a": {"cmd": "x", "metrics": ["out/a.txt"]},
        "data": {"cmd": "x", "outs": ["data"]},
    }}, sort_keys=False))
    assert dvc_stages.stage_order(tmp_path) == ["a", "data", "b", "report"]
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump({"stages": {
        "x": {"cmd": "x", "deps": ["y.txt"], "outs": ["x.txt"]}, "y": {"cmd": "y", "deps": ["x.txt"], "outs": ["y.txt"]},
    }}))
    with pytest.raises(ValueError, match="cycle"):
        dvc_stages.stage_order(tmp_path)


def test_override_strings_use_the_dvc_exp_run_syntax():
    assert flows.override_strings({"train.epochs": 5, "train.lr": 0.01, "data.root": None, "augment.hflip": True,
                                   "train.model": "lenet", "validate.pixel_mean_range": [1.0, 250]}) == [
        "train.epochs=5", "train.lr=0.01", "data.root=null", "augment.hflip=true", "train.model=lenet",
        "validate.pixel_mean_range=[1.0,250]"]


def test_overrides_are_validated_before_params_yaml_changes(tmp_path):
    shutil.copy(ROOT / "params.yaml", tmp_path / "params.yaml")
    before = (tmp_path / "params.yaml").read_text()
    with pytest.raises(flows.OverrideError, match="train.epoch"):
        flows.apply_param_overrides(tmp_path, {"train.epoch": 3})  # unknown key: DVC refuses it
    with pytest.raises(Exception, match="train.epochs"):
        flows.apply_param_overrides(tmp_path, {"train.epochs": 0})  # DVC accepts, the schema refuses
    assert (tmp_path / "params.yaml").read_text() == before
    flows.apply_param_overrides(tmp_path, {"train.epochs": 3})
    text = (tmp_path / "params.yaml").read_text()
    assert yaml.safe_load(text)["train"]["epochs"] == 3
    assert "# lenet | resnet20" in text  # DVC round-trips the YAML: comments stay


def test_stage_policies():
    download, train, prepare = (flows.stage_policy(s) for s in ("download", "train", "prepare"))
    assert download["retries"] == 3 and download["retry_delay_seconds"](3) == [10.0, 20.0, 40.0]
    assert train["retries"] == prepare["retries"] == 1
    assert train["timeout_seconds"] == flows.LONG_STAGE_TIMEOUT_S and prepare["timeout_seconds"] is None


def _tiny_project(path: Path, stages: dict) -> Project:
    """A git + DVC project with the real params.yaml (a user's comment and spacing added) and `stages`."""
    project = Project(path)
    (project.path / "dvc.yaml").write_text(yaml.safe_dump({"stages": stages}, sort_keys=False))
    params = (project.path / "params.yaml").read_bytes()
    (project.path / "params.yaml").write_bytes(b"# my notes, my layout\n\n" + params.replace(b": ", b":   ", 3))
    _commit(project, "tiny pipeline")
    return project


ECHO = {"cmd": "python -c \"import yaml; print(yaml.safe_load(open('params.yaml'))['train']['epochs'])\" > epochs.txt",
        "params": ["train.epochs"], "outs": [{"epochs.txt": {"cache": False}}]}


def test_a_flow_with_overrides_leaves_params_yaml_byte_for_byte(tmp_path, prefect_harness):
    """`make flow SET="train.epochs=2"`: the stage runs with 2, DVC records it (dvc.lock and a saved
    experiment), and the user's params.yaml keeps its bytes, also when a stage fails."""
    project = _tiny_project(tmp_path / "proj", {"echo": ECHO})
    before = (project.path / "params.yaml").read_bytes()

    state = flows.training(project_dir=str(project.path), overrides={"train.epochs": 2}, promote=False, return_state=True)

    assert state.is_completed(), state.message
    assert (project.path / "params.yaml").read_bytes() == before
    assert (project.path / "epochs.txt").read_text().strip() == "2"
    lock = yaml.safe_load((project.path / "dvc.lock").read_text())
    assert lock["stages"]["echo"]["params"]["params.yaml"]["train.epochs"] == 2
    summary = state.result()
    assert summary["experiment"] and summary["pipeline_name"].endswith(" train.epochs=2")
    shown = json.loads(project.run("dvc", "exp", "show", "--json").stdout)
    saved = [e for rev in shown for e in (rev.get("experiments") or []) if e.get("name") == summary["experiment"]]
    assert saved and saved[0]["revs"][0]["data"]["params"]["params.yaml"]["data"]["train"]["epochs"] == 2
    assert "echo" in project.run("dvc", "status").stdout  # honest: the workspace outputs ran with epochs=2

    # a failing stage: the overrides are undone all the same
    dvc_yaml = yaml.safe_load((project.path / "dvc.yaml").read_text())
    dvc_yaml["stages"]["boom"] = {"cmd": "exit 3", "deps": ["epochs.txt"], "outs": ["never.txt"]}
    (project.path / "dvc.yaml").write_text(yaml.safe_dump(dvc_yaml, sort_keys=False))
    failed = flows.training(project_dir=str(project.path), overrides={"train.epochs": 3}, promote=False, return_state=True)
    assert failed.is_failed() and "'boom' failed" in failed.message
    assert (project.path / "params.yaml").read_bytes() == before


def test_stage_tasks_say_when_dvc_skipped_them_and_log_one_record(tmp_path, prefect_harness):
    project = _tiny_project(tmp_path / "proj", {"echo": ECHO})
    first = flows.training(project_dir=str(project.path), promote=False, return_state=True)
    again = flows.training(project_dir=str(project.path), promote=False, return_state=True)
    assert first.is_completed() and again.is_completed()
    ((ran,), (skipped,)) = (_task_runs(_flow_run_id(s)) for s in (first, again))
    assert ran.state.message.startswith("ran in ") and skipped.state.message.startswith("up to date in ")
    assert [s["state"] for s in again.result()["stages"]] == ["up to date"]
    assert "| echo | skipped: up to date (DVC) |" in _artifact(_flow_run_id(again), flows.TRAINING_ARTIFACT).data
    ours = [log.message for log in _logs(ran.id) if not log.message.startswith("Finished in state")]
    assert len(ours) == 1 and "Running stage 'echo'" in ours[0]  # dvc's whole output is one record

    # nothing to do and no server configured: `python -m pipelines training` starts no Prefect at all
    from pipelines.nothing_to_do import nothing_to_do

    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    out = subprocess.run([sys.executable, "-m", "pipelines", "training", "--no-promote", "--project-dir", str(project.path)],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=120, check=False)
    assert out.returncode == 0 and out.stdout.startswith("nothing to do: `dvc status` says every stage is up to date"), out
    assert "Starting temporary server" not in out.stderr
    assert nothing_to_do(project.path, promote=False, env={"PREFECT_API_URL": "http://x/api"}) is None  # a UI: run
    assert "visionops-classifier: no challenger" in nothing_to_do(project.path, promote=True, env={})
    (project.path / "params.yaml").write_bytes((project.path / "params.yaml").read_bytes().replace(b"  epochs: 10", b"  epochs: 9", 1))
    assert nothing_to_do(project.path, promote=False, env={}) is None  # the echo stage would run


# Two stages whose outputs DVC caches, so both go to its run cache: `b` doubles the epochs `a` wrote.
CACHED = {
    "a": {"cmd": "python -c \"import yaml; print(yaml.safe_load(open('params.yaml'))['train']['epochs'])\" > a.txt",
          "params": ["train.epochs"], "outs": ["a.txt"]},
    "b": {"cmd": "python -c \"print(open('a.txt').read().strip() * 2)\" > b.txt", "deps": ["a.txt"], "outs": ["b.txt"]},
}


def test_a_stage_restored_from_the_run_cache_changes_what_follows_it(tmp_path, prefect_harness):
    """Issue 25: `dvc exp run -S train.epochs=2`, back to 10, then `make flow SET="train.epochs=2"`. DVC restores
    `a` from its run cache (no "Running stage"): its output changed, so `b` must follow it, as in `dvc repro`."""
    project = _tiny_project(tmp_path / "proj", CACHED)
    project.repro()
    project.run("dvc", "exp", "run", "-S", "train.epochs=2")
    project.run("git", "checkout", "--", "params.yaml")
    assert "is cached - skipping run" in project.repro().stdout  # back to 10, from the run cache

    state = flows.training(project_dir=str(project.path), overrides={"train.epochs": 2}, promote=False, return_state=True)

    assert state.is_completed(), state.message
    assert [s["state"] for s in state.result()["stages"]] == [dvc_stages.RESTORED] * 2
    assert (project.path / "a.txt").read_text().strip() == "2" and (project.path / "b.txt").read_text().strip() == "22"
    lock = yaml.safe_load((project.path / "dvc.lock").read_text())["stages"]
    assert lock["b"]["deps"][0]["md5"] == lock["a"]["outs"][0]["md5"]  # b ran on the a.txt that is there
    assert [line.split(":")[0] for line in project.run("dvc", "status").stdout.splitlines()[:1]] == ["a"]  # params 10, ran with 2
    markdown = _artifact(_flow_run_id(state), flows.TRAINING_ARTIFACT).data
    assert "| b | restored from DVC's run cache (outputs changed, command not run) |" in markdown


def _logs(task_run_id) -> list:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterTaskRunId

    with get_client(sync_client=True) as client:
        return client.read_logs(log_filter=LogFilter(task_run_id=LogFilterTaskRunId(any_=[task_run_id])))


# ------------------------------------------------------------------------------------------
# flows on the real pipeline


@pytest.mark.slow
def test_training_flow_runs_every_stage_as_a_task_then_promotes(trained):
    state = trained.state
    assert state.is_completed(), state.message
    flow_run_id = _flow_run_id(state)
    runs = _task_runs(flow_run_id)
    stage_runs = [r for r in runs if r.name in STAGES]
    assert [r.name for r in stage_runs] == STAGES
    assert all(r.state.is_completed() and r.run_count == 1 for r in stage_runs)
    assert [r.name for r in runs][-1] == "promote"
    summary = state.result()
    assert [s["state"] for s in summary["stages"]] == ["ran"] * len(STAGES)

    # every MLflow stage run of this flow run carries its id and one pipeline id
    runs = _mlflow_runs(trained, **{"prefect.flow_run_id": flow_run_id, "visionops.role": "stage"})
    assert sorted(r.data.tags["visionops.stage"] for r in runs) == sorted(WITH_RUNS)
    assert {r.data.tags["visionops.pipeline_run_id"] for r in runs} == {f"prefect-{flow_run_id}"}

    # the teacher became champion when it was registered; the 1-epoch student is a rejected challenger
    teacher, student = summary["promotion"]
    assert teacher["outcome"] == "no challenger" and teacher["champion_version"] == "1"
    assert student["outcome"] == "rejected" and student["reasons"]

    markdown = _artifact(flow_run_id, flows.TRAINING_ARTIFACT).data
    for text in ("COMPLETED", "teacher test accuracy", "student test accuracy", "REJECTED", *(r.info.run_id for r in runs)):
        assert text in markdown, text


@pytest.mark.slow
def test_a_stage_failing_once_is_retried(trained, no_retry_delays):
    """A real extra DVC stage that fails on its first run (and leaves a marker) and succeeds on the retry."""
    project = trained
    dvc_yaml = yaml.safe_load((project.path / "dvc.yaml").read_text())
    dvc_yaml["stages"]["flaky"] = {
        "cmd": "test -f .flaky-ok || { touch .flaky-ok; echo 'flaky: first attempt fails' >&2; exit 3; }; "
        "mkdir -p reports/flaky && echo ok > reports/flaky/ok.txt",
        "deps": ["reports/validate/summary.json"],
        "outs": [{"reports/flaky/ok.txt": {"cache": False}}],
    }
    (project.path / "dvc.yaml").write_text(yaml.safe_dump(dvc_yaml, sort_keys=False))

    state = flows.training(project_dir=str(project.path), promote=False, return_state=True)

    assert state.is_completed(), state.message
    runs = {r.name: r for r in _task_runs(_flow_run_id(state))}
    assert runs["flaky"].run_count == 2 and runs["flaky"].state.is_completed()
    assert all(runs[s].run_count == 1 for s in STAGES)
    summary = state.result()
    # resolve_init and register are always_changed (DVC cannot see the registry): they run, and change nothing
    assert [s["state"] for s in summary["stages"]] == ["ran" if s in ALWAYS_RUN else "up to date" for s in STAGES] + ["ran"]
    assert [s["attempt"] for s in summary["stages"]] == [1] * len(STAGES) + [2]
    assert "| flaky | ran (attempt 2) |" in _artifact(_flow_run_id(state), flows.TRAINING_ARTIFACT).data
    assert (project.path / "reports/flaky/ok.txt").read_text().strip() == "ok"


# A stage command with an MLflow run as the real stages have (track_stage); its first attempt fails (MODE fail) or
# hangs until its task's timeout terminates dvc's process group (MODE hang). The retry succeeds.
TRACKED = """
import sys, time
from pathlib import Path
from visionops.config import load_params
from visionops.tracking.stage_run import track_stage
first = not Path(".attempted").exists()
Path(".attempted").touch()
with track_stage("tracked", load_params("params.yaml"), ("validate",), in_process=IN_PROCESS) as run:
    if hasattr(run, "wait_open"):
        run.wait_open()
    if first and "MODE" == "fail":
        raise RuntimeError("first attempt fails")
    if first:
        time.sleep(600)
Path("done.txt").write_text("ok")
"""


@pytest.mark.parametrize("mode,in_process,reason", [
    ("fail", False, "RuntimeError: first attempt fails"),
    pytest.param("hang", True, "Terminated: terminated by SIGTERM", marks=pytest.mark.slow),
])
def test_a_retried_stage_records_both_attempts_linked(tmp_path, prefect_harness, no_retry_delays, monkeypatch,
                                                      mode, in_process, reason):
    """Issue 25: a retried stage task leaves two MLflow runs; the first ends FAILED (an error) or KILLED (the task
    timeout's SIGTERM) with its reason, linked to the retry, and the pipeline's parent run ends FINISHED."""
    project = _tiny_project(tmp_path / "proj", {"tracked": {
        "cmd": "python tracked.py", "deps": ["tracked.py"], "outs": [{"done.txt": {"cache": False}}]}})
    (project.path / "tracked.py").write_text(TRACKED.replace("MODE", mode).replace("IN_PROCESS", str(in_process)))
    monkeypatch.setattr(flows, "LONG_STAGES", ("tracked",))
    monkeypatch.setattr(flows, "LONG_STAGE_TIMEOUT_S", 60)  # the hanging attempt's run is open well before

    state = flows.training(project_dir=str(project.path), promote=False, return_state=True)

    assert state.is_completed(), state.message
    flow_run_id = _flow_run_id(state)
    (task_run,) = _task_runs(flow_run_id)
    assert task_run.run_count == 2 and state.result()["stages"][0]["attempt"] == 2
    first, retry = sorted(_mlflow_runs(project, **{"prefect.flow_run_id": flow_run_id, "visionops.stage": "tracked"}),
                          key=lambda r: r.info.start_time)
    assert (first.info.status, retry.info.status) == ({"fail": "FAILED", "hang": "KILLED"}[mode], "FINISHED")
    assert first.data.tags[faults.END_REASON_TAG].startswith(reason)
    assert first.data.tags[faults.RETRIED_BY_TAG] == retry.info.run_id and retry.data.tags[faults.RETRY_OF_TAG] == first.info.run_id
    (parent,) = _mlflow_runs(project, **{"prefect.flow_run_id": flow_run_id, "visionops.role": "pipeline"})
    assert parent.info.status == "FINISHED"


@pytest.mark.slow
def test_a_stage_that_keeps_failing_fails_the_flow_naming_it(tmp_path, prefect_harness, no_retry_delays):
    project = Project(tmp_path / "proj")
    project.set_params(**FAST)
    missing = tmp_path / "no-such-images"

    state = flows.training(
        project_dir=str(project.path), overrides={"data.source": "folder", "data.root": str(missing)}, return_state=True
    )

    assert state.is_failed()
    assert "DVC stage 'download' failed with exit code 1" in state.message and str(missing) in state.message
    runs = _task_runs(_flow_run_id(state))
    assert [r.name for r in runs] == ["apply-overrides", "download"]  # nothing after the failed stage
    assert runs[1].state.is_failed() and runs[1].run_count == 1 + flows.DOWNLOAD_RETRIES
    assert not (project.path / "data/dataset").exists()
    markdown = _artifact(_flow_run_id(state), flows.TRAINING_ARTIFACT).data
    assert "FAILED" in markdown and "| validate | not run |" in markdown


@pytest.mark.slow
def test_overrides_reach_dvc_and_are_recorded(trained):
    project = trained
    before = (project.path / "params.yaml").read_bytes()
    state = flows.training(
        project_dir=str(project.path), overrides={"distill.temperature": 2.0}, promote=False,
        experiment_name="cooler", return_state=True,
    )

    assert state.is_completed(), state.message
    ran = {s["stage"]: s["state"] for s in state.result()["stages"]}
    rerun = {"distill": "ran", "resolve_init": "ran", "register": "ran"}  # a new student file is registered
    assert ran == {**{s: "up to date" for s in STAGES}, **rerun, **({"flaky": "up to date"} if "flaky" in ran else {})}
    assert json.loads((project.path / "reports/distill/details.json").read_text())["temperature"] == 2.0
    lock = yaml.safe_load((project.path / "dvc.lock").read_text())
    assert lock["stages"]["distill"]["params"]["params.yaml"]["distill"]["temperature"] == 2.0
    assert (project.path / "params.yaml").read_bytes() == before  # the user's params, byte for byte
    assert "distill" in project.run("dvc", "status").stdout  # the outputs ran with the override, and DVC says so
    shown = json.loads(project.run("dvc", "exp", "show", "--json").stdout)
    saved = [e for rev in shown for e in (rev.get("experiments") or []) if e.get("name") == "cooler"]
    assert saved, json.dumps(shown)[:2000]
    assert saved[0]["revs"][0]["data"]["params"]["params.yaml"]["data"]["distill"]["temperature"] == 2.0


def _drifted_folder(project: Project, root: Path, per_class: int = 60) -> Path:
    """The project's digits as an ImageFolder tree, each class filed under the next class's folder.

    The holdout's images come first: an image keeps its split by content, so only they can land in the
    newest data's holdout again.
    """
    from PIL import Image

    from visionops.data import dataset

    holdout, ds = dataset.load(project.path / "data/holdout"), dataset.load(project.path / "data/dataset")
    names = ds.class_names
    counts = {}
    for split in [*holdout.splits.values(), *ds.splits.values()]:
        for image, label in zip(split.images, split.labels, strict=True):
            label = int(label)
            if counts.get(label, 0) >= per_class:
                continue
            counts[label] = counts.get(label, 0) + 1
            folder = root / names[(label + 1) % len(names)]
            folder.mkdir(parents=True, exist_ok=True)
            pixels = image[..., 0] if image.shape[-1] == 1 else image
            Image.fromarray(pixels).save(folder / f"{label}_{counts[label]}.png")
    return root


@pytest.fixture(scope="module")
def watched(tmp_path_factory, prefect_harness):
    """A project with a workspace written by the download core (data/dataset, data/holdout) and a champion:
    a LeNet trained here on its train split, registered, and promoted on its holdout (no training flow)."""
    import mlflow
    import numpy as np
    import torch

    from visionops.config import load_params
    from visionops.data import dataset
    from visionops.data.download import run_download
    from visionops.serving.promotion import promote
    from visionops.serving.pyfunc import log_classifier
    from visionops.tasks.classification import classifier
    from visionops.tracking.store import configure

    project = Project(tmp_path_factory.mktemp("monitor") / "proj")
    params = load_params(project.path / "params.yaml")
    data = params.data.model_copy(update={"cache_dir": str(project.path / params.data.cache_dir)})
    run_download(data, project.path / "data/dataset", holdout_dir=project.path / "data/holdout")
    train = dataset.load(project.path / "data/dataset").splits["train"]
    shape = tuple(train.images.shape[1:])
    names = dataset.load(project.path / "data/dataset").class_names
    torch.manual_seed(0)
    model = classifier.build("lenet", names, shape, *classifier.channel_stats(train.images))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    x, y = torch.from_numpy(np.array(train.images)).permute(0, 3, 1, 2), torch.from_numpy(train.labels)
    for _ in range(400):
        idx = torch.randint(0, len(y), (64,))
        loss = torch.nn.functional.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    classifier.save(project.path / "teacher.pt", model.eval(), "lenet", names, shape)
    mlflow.set_experiment(experiment_id=configure(params.mlflow, project.path))  # artifacts in the project
    with mlflow.start_run():
        version = log_classifier(project.path / "teacher.pt", params.mlflow.teacher_model_name, tags={}).version
    decision = promote(params.mlflow.teacher_model_name, project.path / "data/holdout", params.promote, params.evaluate,
                       version=str(version))
    assert decision.promoted, decision.reasons
    return project


def _tree(path: Path) -> dict:
    """The directory's inode and every file's content hash: what "untouched" means."""
    import hashlib

    files = {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(path.rglob("*")) if p.is_file()}
    return {"inode": path.stat().st_ino, "files": files}


@pytest.mark.slow
def test_monitoring_passes_then_fails_on_drifted_data_and_never_touches_the_workspace(watched, tmp_path):
    from visionops.data import dataset

    project = watched
    workspace = ("data/dataset", "data/holdout")
    before = {d: _tree(project.path / d) for d in workspace}
    assert before["data/dataset"]["files"] and before["data/holdout"]["files"]

    ok = flows.monitoring(project_dir=str(project.path), return_state=True)
    assert ok.is_completed(), ok.message
    newest = dataset.load(project.path / flows.MONITORING / "holdout")
    assert list(newest.splits) == ["holdout"]
    assert ok.result()["accuracy"] >= 0.9 and ok.result()["version"] == "1"
    assert ok.result()["n"] == len(newest.splits["holdout"])
    assert [s["stage"] for s in ok.result()["stages"]] == ["fetch-newest-data", "validate-newest-data"]
    assert "Monitoring: OK" in _artifact(_flow_run_id(ok), flows.MONITORING_ARTIFACT).data

    # the newest data: the same digits, but every class now files its images under the next class's folder
    root = _drifted_folder(project, tmp_path / "incoming")
    project.set_params(data={"source": "folder", "root": str(root)})
    state = flows.monitoring(project_dir=str(project.path), return_state=True)

    assert state.is_failed()
    assert "below monitor.min_score 0.9000" in state.message and "holdout images" in state.message
    accuracy = float(state.message.split(" accuracy ")[1].split()[0])
    assert accuracy < 0.2
    runs = {r.name: r for r in _task_runs(_flow_run_id(state))}
    assert runs["fetch-newest-data"].state.is_completed() and runs["validate-newest-data"].state.is_completed()
    markdown = _artifact(_flow_run_id(state), flows.MONITORING_ARTIFACT).data
    assert "Monitoring: ALERT" in markdown and f"{accuracy:.4f}" in markdown

    # refresh_data=False evaluates the last fetch again without fetching
    again = flows.monitoring(project_dir=str(project.path), refresh_data=False, return_state=True)
    assert again.is_failed() and f"accuracy {accuracy:.4f}" in again.message
    assert "fetch-newest-data" not in {r.name for r in _task_runs(_flow_run_id(again))}

    # the training workspace and the frozen holdout are exactly as they were; no DVC stage ran
    assert {d: _tree(project.path / d) for d in workspace} == before
    assert not (project.path / "dvc.lock").exists()


# ------------------------------------------------------------------------------------------
# the scheduled deployment on a real Prefect server


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def prefect_server(tmp_path):
    port = _free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "PREFECT_HOME": str(tmp_path / "prefect-home"),
        "PREFECT_API_URL": api,
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_UI_ENABLED": "false",
    }
    env.pop("PREFECT_API_KEY", None)
    log = (tmp_path / "server.log").open("w")
    proc = subprocess.Popen(
        ["prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    (tmp_path / "prefect-home").mkdir(exist_ok=True)
    (tmp_path / "prefect-home" / "server.pid").write_text(str(proc.pid))  # as `make prefect-ui` writes it
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"{api}/health", timeout=2) as resp:
                    if resp.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"prefect server did not start:\n{(tmp_path / 'server.log').read_text()[-3000:]}")
            time.sleep(0.5)
        yield api, env
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()


@pytest.mark.slow
def test_nightly_deployment_is_registered_with_the_params_cron(prefect_server):
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    api, env = prefect_server
    cmd = [sys.executable, "-m", "pipelines", "deploy"]
    out = subprocess.run(cmd, check=False, cwd=ROOT, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]

    schedule = yaml.safe_load((ROOT / "params.yaml").read_text())["schedule"]
    with temporary_settings({PREFECT_API_URL: api}), get_client(sync_client=True) as client:
        nightly = client.read_deployment_by_name("training/nightly")
        promotion = client.read_deployment_by_name("promotion/manual")
        monitoring = client.read_deployment_by_name("monitoring/daily")
        drift = client.read_deployment_by_name("drift/hourly")
    assert len(nightly.schedules) == 1
    (sched,) = nightly.schedules
    assert sched.active and not nightly.paused
    assert sched.schedule.cron == schedule["cron"] and sched.schedule.timezone == schedule["timezone"]
    assert nightly.parameters["project_dir"] == str(ROOT) and nightly.parameters["refresh_data"] is True
    assert nightly.entrypoint == "pipelines.flows.training"
    assert promotion.schedules == [] and monitoring.schedules[0].schedule.cron == "0 6 * * *"
    assert drift.schedules[0].schedule.cron == schedule["drift_cron"] and drift.entrypoint == "pipelines.drift.drift"


@pytest.mark.slow
def test_prefect_stop_stops_serve_first_then_the_server_cleanly(prefect_server, tmp_path):
    """What `make schedule` starts (a server, then `serve` with its PID file) `make prefect-stop` stops in order."""
    api, env = prefect_server
    home = Path(env["PREFECT_HOME"])
    log = (tmp_path / "serve.log").open("w")
    serve = subprocess.Popen([sys.executable, "-m", "pipelines", "serve"], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    (home / "serve.pid").write_text(str(serve.pid))
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    deadline = time.monotonic() + 120
    with temporary_settings({PREFECT_API_URL: api}), get_client(sync_client=True) as client:
        while time.monotonic() < deadline:  # serving: its deployments are registered
            try:
                client.read_deployment_by_name("training/nightly")
                break
            except Exception:  # noqa: BLE001 - not registered yet
                time.sleep(1)

    start = time.monotonic()
    out = subprocess.run([sys.executable, "-m", "pipelines", "stop", "--prefect-home", str(home)], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=120, check=False)
    elapsed = time.monotonic() - start
    log.close()
    assert out.returncode == 0, out.stderr
    assert serve.poll() is not None, "serve still running"
    lines = out.stdout.splitlines()
    assert lines[0].startswith("stopped the Prefect serve process") and lines[1].startswith("stopped the Prefect server")
    assert "SIGKILL" not in out.stdout and elapsed < 40, (out.stdout, elapsed)
    assert "Traceback" not in (tmp_path / "serve.log").read_text()
    assert not (home / "serve.pid").exists() and not (home / "server.pid").exists()


def test_the_training_flow_does_not_rejudge_a_challenger_rejected_against_the_same_champion_and_gates(tmp_path, monkeypatch):
    """A real MLflow registry: v2 was rejected against champion v1 under today's gates, so the training flow's
    promotion keeps that decision (no holdout exists here: judging again would fail); new gates mean judge again."""
    from mlflow import MlflowClient

    from pipelines.nothing_to_do import _judged
    from visionops.config import load_params

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    (tmp_path / "params.yaml").write_text(f"mlflow:\n  tracking_uri: {store}\n")
    gates = json.loads(load_params(tmp_path / "params.yaml").promote.model_dump_json())
    client = MlflowClient(store)
    for name in ("visionops-classifier", "visionops-student"):
        client.create_registered_model(name)
        for _ in range(2):
            client.create_model_version(name, source=str(tmp_path), run_id=None)
        client.set_registered_model_alias(name, "champion", "1")
        client.set_registered_model_alias(name, "challenger", "2")
        for key, value in {"promotion.decision": "rejected", "promotion.previous_champion": "1",
                           "promotion.reasons": json.dumps(["accuracy 0.5 < 0.9"]), "promotion.timestamp": "T",
                           "promotion.metrics": json.dumps({"gates": gates})}.items():
            client.set_model_version_tag(name, "2", key, value)

    outcomes = flows.promote_all(tmp_path, rejudge=False)
    assert [(o["outcome"], o["challenger_version"], o["champion_version"]) for o in outcomes] == [("rejected", "2", "1")] * 2
    assert outcomes[0]["reasons"] == ["already judged at T against the same champion and gates; not judged again",
                                      "accuracy 0.5 < 0.9"]
    assert "challenger v2 already rejected (T) against champion v1" in "\n".join(_judged(tmp_path))  # make flow: no run

    (tmp_path / "params.yaml").write_text(f"mlflow:\n  tracking_uri: {store}\npromote:\n  min_score: 0.5\n")
    assert _judged(tmp_path) is None  # make flow runs the flow
    with pytest.raises(Exception, match="holdout"):  # other gates: judged again (and this project has no holdout)
        flows.promote_all(tmp_path, rejudge=False)


# ------------------------------------------------------------------------------------------
# every task through the same flow, stages, tracking and registry

# each preset with fewer canvases and epochs (and gates the short run can pass), for the suite's time budget
TASK_FAST = {
    "detection": {"data": {"canvases": {"count": 600}}, "train": {"epochs": 6}, "distill": {"epochs": 2},
                  "promote": {"min_score": 0.05, "min_class_score": 0.0}},
    "segmentation": {"data": {"canvases": {"count": 600}}, "train": {"epochs": 6}, "distill": {"epochs": 2},
                     "promote": {"min_score": 0.05, "min_class_score": 0.0}},
}


@pytest.mark.slow
@pytest.mark.parametrize("task", sorted(TASK_FAST))
def test_training_flow_runs_detection_and_segmentation_end_to_end(task, tmp_path, prefect_harness):
    """The preset of each task through the Prefect training flow: the same eight DVC stages as tasks, each an
    MLflow run with its lineage, the task's models registered, and the first teacher promoted on its headline
    metric (mAP@.5 or mIoU) on the frozen holdout."""
    import mlflow

    project = Project(tmp_path / "proj", params=ROOT / "presets" / f"{task}.yaml")
    params = yaml.safe_load((project.path / "params.yaml").read_text())
    for section, values in TASK_FAST[task].items():
        for key, value in values.items():
            params[section][key] = {**params[section][key], **value} if isinstance(value, dict) else value
    (project.path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    _commit(project, f"{task} preset, fast")

    state = flows.training(project_dir=str(project.path), return_state=True)

    assert state.is_completed(), state.message
    flow_run_id = _flow_run_id(state)
    summary = state.result()
    assert [s["state"] for s in summary["stages"]] == ["ran"] * len(STAGES)
    runs = _mlflow_runs(project, **{"prefect.flow_run_id": flow_run_id, "visionops.role": "stage"})
    assert sorted(r.data.tags["visionops.stage"] for r in runs) == sorted(WITH_RUNS)
    assert {r.data.params["task"] for r in runs} == {task}
    assert {r.data.tags["visionops.pipeline_run_id"] for r in runs} == {f"prefect-{flow_run_id}"}
    headline = {"detection": "map_50", "segmentation": "miou"}[task]
    evaluate = next(r for r in runs if r.data.tags["visionops.stage"] == "evaluate")
    assert 0.0 <= evaluate.data.metrics[headline] <= 1.0

    client = mlflow.MlflowClient(f"sqlite:///{project.path / 'mlflow.db'}")
    teacher_name, student_name = params["mlflow"]["teacher_model_name"], params["mlflow"]["student_model_name"]
    champion = client.get_model_version_by_alias(teacher_name, "champion")
    assert champion.tags["promotion.decision"] == "promoted" and champion.run_id in {r.info.run_id for r in runs}
    record = json.loads(champion.tags["promotion.metrics"])["challenger"]
    assert record["headline"] == headline and record[headline] >= 0.05
    assert client.search_model_versions(f"name = '{student_name}'")


# ------------------------------------------------------------------------------------------
# issue 25: the flow never decides in DVC's place. Two fresh copies of the project go through the same steps, one
# driven by the training flow, the other by `dvc repro` / `dvc exp run`: a params edit, an experiment and back
# (stages restored from DVC's run cache), and a run whose `train` is killed mid-way, then resumed. After each step
# both hold the same dvc.lock (byte for byte: every dep, param and output hash), the same metrics files and the
# same `dvc status`, clean wherever `dvc repro` leaves it clean.

# The embedded digits, a LeNet teacher of 1-3 epochs (a fraction of a second each), one distill epoch, no
# student-alone baseline: every stage runs for real, as briefly as it can.
EQUIVALENCE = {
    "train": {"model": "lenet", "epochs": 1, "optimizer": "adamw", "lr": 0.003},
    "distill": {"epochs": 1, "baseline": False},
    "evaluate": {"gradcam_samples": 2},
}
# `register` and `resolve_init` are `always_changed: true` (they read the registry, which DVC cannot see), so
# `dvc status` lists them as "always changed" even right after `dvc repro`: those entries are expected.
ALWAYS_CHANGED = {"register": ["always changed"], "resolve_init": ["always changed"]}


def _status(project: Project) -> dict:
    """`dvc status --json` by stage name, less the "always changed" of ALWAYS_CHANGED."""
    status = json.loads(project.run("dvc", "status", "--json").stdout)
    by_stage = {name.rsplit(":", 1)[-1]: entries for name, entries in status.items()}
    return {name: entries for name, entries in by_stage.items() if ALWAYS_CHANGED.get(name) != entries}


def _metrics(project: Project) -> dict:
    return {str(p.relative_to(project.path)): json.loads(p.read_text()) for p in sorted(project.path.glob("reports/*/metrics.json"))}


def _assert_same(flow: Project, dvc: Project, step: str, clean: bool = True) -> None:
    assert (flow.path / "dvc.lock").read_text() == (dvc.path / "dvc.lock").read_text(), step
    assert _metrics(flow) == _metrics(dvc) and _metrics(flow), step
    status = _status(flow)
    assert status == _status(dvc), step
    if clean:
        assert status == {}, (step, status)


def _flow(project: Project, **kwargs) -> dict:
    state = flows.training(project_dir=str(project.path), promote=False, return_state=True, **kwargs)
    assert state.is_completed(), state.message
    return {**state.result(), "flow_run_id": _flow_run_id(state)}


def _outcomes(summary: dict) -> dict[str, str]:
    return {s["stage"]: s["state"] for s in summary["stages"]}


class TrainKiller(threading.Thread):
    """Kills the project's `visionops train` process (-9, the stage only; dvc sees it die) once its first
    epoch is checkpointed (the MLflow sidecar is written just after the checkpoint): a stage interrupted
    mid-way, which the next `dvc repro` resumes."""

    def __init__(self, project: Project, timeout_s: float = 600):
        super().__init__(daemon=True)
        self.checkpoint = project.path / "models" / "checkpoints" / "train.mlflow.json"
        self.cwd, self.deadline, self.killed = str(project.path), time.monotonic() + timeout_s, False

    def run(self) -> None:
        while not self.checkpoint.exists():
            if time.monotonic() > self.deadline:
                return
            time.sleep(0.01)
        for proc in psutil.process_iter(["cmdline", "cwd"]):
            cmd = proc.info["cmdline"] or []
            if proc.info["cwd"] == self.cwd and "train" in cmd and any(os.path.basename(c) == "visionops" for c in cmd[:2]):
                proc.kill()
                self.killed = True


@pytest.fixture(scope="module")
def pair(tmp_path_factory, prefect_harness):
    root = tmp_path_factory.mktemp("equivalence")
    projects = []
    for name in ("flow", "dvc"):
        project = Project(root / name)
        project.set_params(**EQUIVALENCE)
        _commit(project, "fast params")
        projects.append(project)
    return projects


@pytest.mark.slow
def test_the_flow_and_dvc_repro_end_alike_step_by_step(pair, no_retry_delays):
    flow, dvc = pair

    # a first run of everything
    first = _flow(flow)
    dvc.repro()
    assert set(_outcomes(first).values()) == {dvc_stages.RAN}
    _assert_same(flow, dvc, "first run")

    # a params edit: train and what follows it run
    for project in pair:
        project.set_params(train={"epochs": 2})
    edited = _flow(flow)
    dvc.repro()
    assert _outcomes(edited)["validate"] == dvc_stages.UP_TO_DATE and _outcomes(edited)["train"] == dvc_stages.RAN
    _assert_same(flow, dvc, "params edit")

    # an experiment with the first run's epochs (`make flow SET=...` / `dvc exp run -S`): train comes back from
    # DVC's run cache, and so must evaluate, distill and register follow it (the scenario)
    for project in pair:
        _commit(project, "two epochs")
    experiment = _flow(flow, overrides={"train.epochs": 1})
    dvc.run("dvc", "exp", "run", "-S", "train.epochs=1")
    assert _outcomes(experiment)["train"] == dvc_stages.RESTORED
    assert _outcomes(experiment)["evaluate"] == dvc_stages.RESTORED and _outcomes(experiment)["register"] == dvc_stages.RAN
    # the flow gives params.yaml its bytes back (`dvc exp run` leaves the experiment's params): alike, the two
    # copies' `dvc status` lists the stages whose params now differ from the ones they ran with
    dvc.run("git", "checkout", "--", "params.yaml")
    _assert_same(flow, dvc, "experiment", clean=False)
    assert _status(flow)

    # and back to params.yaml: everything it changed comes back from the run cache
    back = _flow(flow)
    dvc.repro()
    assert _outcomes(back)["train"] == _outcomes(back)["evaluate"] == dvc_stages.RESTORED
    _assert_same(flow, dvc, "back from the experiment")

    # an interrupted run: train is killed after its first epoch, then resumed (the flow's retry; a second
    # `dvc repro`)
    for project in pair:
        project.set_params(train={"epochs": 30})
    killers = [TrainKiller(project) for project in pair]
    for killer in killers:
        killer.start()
    interrupted = flows.training(project_dir=str(flow.path), promote=False, return_state=True)
    assert dvc.repro(check=False).returncode != 0
    for killer in killers:
        killer.join(timeout=60)
    assert [k.killed for k in killers] == [True, True]
    assert interrupted.is_completed(), interrupted.message
    resumed = dvc.repro()
    assert "resuming from models/checkpoints/train.pt" in resumed.stdout + resumed.stderr
    train = next(s for s in interrupted.result()["stages"] if s["stage"] == "train")
    assert (train["state"], train["attempt"]) == (dvc_stages.RAN, 2)
    _assert_same(flow, dvc, "interrupted, then resumed")

    # the flow run's record of it: the killed attempt KILLED, with why, linked to the retry that resumed it
    runs = _mlflow_runs(flow, **{"prefect.flow_run_id": _flow_run_id(interrupted), "visionops.stage": "train"})
    killed, retry = sorted(runs, key=lambda r: r.info.start_time)
    assert (killed.info.status, retry.info.status) == ("KILLED", "FINISHED")
    assert "killed or crashed" in killed.data.tags[faults.END_REASON_TAG]
    assert retry.data.tags[faults.RETRY_OF_TAG] == killed.info.run_id == retry.data.tags[faults.RESUMED_FROM_TAG]
    assert killed.data.tags[faults.RETRIED_BY_TAG] == retry.info.run_id

