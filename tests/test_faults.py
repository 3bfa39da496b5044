"""After a crash the MLflow store tells the truth: orphans end KILLED, resumes link, parents show the worst."""

import json
import os
import subprocess
import sys

import mlflow
import pytest

from visionops.config import Params
from visionops.tracking import faults
from visionops.tracking.lineage import PIPELINE_RUN_ENV
from visionops.tracking.stage_run import track_stage

# A stage process that opens its run, checkpoints `epochs` epochs of `desc`, then is killed -9.
KILLED_STAGE = """
import os, signal, sys
from visionops.config import Params
from visionops.tracking.stage_run import track_stage
params = Params.model_validate({"mlflow": {"tracking_uri": sys.argv[1]}})
with track_stage("train", params, ("train",), in_process=IN_PROCESS) as run:
    for epoch in range(1, EPOCHS + 1):
        if hasattr(run, "log_epoch"):
            run.log_epoch("train", {"epoch": epoch, "val_acc": 0.1 * epoch})
    os.kill(os.getpid(), signal.SIGKILL)
"""


@pytest.fixture
def store(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv(PIPELINE_RUN_ENV, raising=False)
    return f"sqlite:///{tmp_path / 'mlflow.db'}"


def _kill_a_stage(store, tmp_path, epochs: int, in_process: bool = True, pipeline: str = "p1") -> None:
    script = tmp_path / "stage.py"
    script.write_text(KILLED_STAGE.replace("EPOCHS", str(epochs)).replace("IN_PROCESS", str(in_process)))
    env = {**os.environ, PIPELINE_RUN_ENV: pipeline, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.run([sys.executable, str(script), store], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert proc.returncode == -9, proc.stderr


def _runs(store, role="stage"):
    client = mlflow.MlflowClient(tracking_uri=store)
    exp = client.get_experiment_by_name("visionops")
    runs = client.search_runs([exp.experiment_id], f"tags.`visionops.role` = '{role}'", order_by=["start_time"])
    return client, runs


def test_killed_stage_run_is_ended_and_the_resumed_run_links_to_it(store, tmp_path, monkeypatch):
    _kill_a_stage(store, tmp_path, epochs=3)
    client, (orphan,) = _runs(store)
    assert orphan.info.status == "RUNNING"  # what kill -9 leaves behind
    assert orphan.data.tags[faults.PID_TAG] and orphan.data.tags[faults.HOST_TAG]

    monkeypatch.setenv(PIPELINE_RUN_ENV, "p2")
    params = Params.model_validate({"mlflow": {"tracking_uri": store}})
    with track_stage("train", params, ("train",)) as run:
        for epoch in (4, 5):  # the trainer resumed from the checkpoint of epoch 3
            run.log_epoch("train", {"epoch": epoch, "val_acc": 0.1 * epoch})
    client, (killed, resumed) = _runs(store)
    assert killed.info.run_id == orphan.info.run_id and killed.info.status == "KILLED"
    assert "ended without closing the run" in killed.data.tags[faults.END_REASON_TAG]
    assert resumed.info.status == "FINISHED"
    assert resumed.data.tags[faults.RESUMED_FROM_TAG] == killed.info.run_id
    assert killed.data.tags[faults.RESUMED_BY_TAG] == resumed.info.run_id
    _, parents = _runs(store, "pipeline")
    assert [p.info.status for p in parents] == ["KILLED", "FINISHED"]
    assert not (tmp_path / "models" / "checkpoints" / "train.mlflow.json").exists()  # the stage finished


def test_a_fresh_start_after_a_kill_is_not_linked(store, tmp_path, monkeypatch):
    _kill_a_stage(store, tmp_path, epochs=2)
    monkeypatch.setenv(PIPELINE_RUN_ENV, "p2")
    params = Params.model_validate({"mlflow": {"tracking_uri": store}})
    with track_stage("train", params, ("train",)) as run:  # other settings: the checkpoint did not match
        run.log_epoch("train", {"epoch": 1, "val_acc": 0.1})
    _, (killed, fresh) = _runs(store)
    assert killed.info.status == "KILLED" and faults.RESUMED_FROM_TAG not in fresh.data.tags
    assert faults.RESUMED_BY_TAG not in killed.data.tags


def test_a_helper_kept_run_ends_killed_when_its_stage_is_killed(store, tmp_path):
    _kill_a_stage(store, tmp_path, epochs=0, in_process=False)
    client = mlflow.MlflowClient(tracking_uri=store)
    exp = client.get_experiment_by_name("visionops")
    import time

    deadline = time.time() + 60  # the helper notices the closed pipe and ends the run
    while (run := _runs(store)[1][0]).info.status == "RUNNING":
        assert time.time() < deadline, "the helper left the run RUNNING"
        time.sleep(0.2)
    assert run.info.status == "KILLED" and "without reporting" in run.data.tags[faults.END_REASON_TAG]
    assert client.search_runs([exp.experiment_id], "attributes.status = 'RUNNING'") == []


def test_the_parent_run_has_the_status_of_its_worst_stage(store, monkeypatch):
    monkeypatch.setenv(PIPELINE_RUN_ENV, "p1")
    params = Params.model_validate({"mlflow": {"tracking_uri": store}})
    with pytest.raises(RuntimeError):
        with track_stage("validate", params, ("validate",)):
            raise RuntimeError("bad data")
    with track_stage("prepare", params, ("balance",)):
        _, (parent,) = _runs(store, "pipeline")
        assert parent.info.status == "FAILED"  # a later stage does not hide the failure
    with track_stage("evaluate", params, ("evaluate",)):
        pass
    _, (parent,) = _runs(store, "pipeline")
    assert parent.info.status == "FAILED"
    monkeypatch.setenv(PIPELINE_RUN_ENV, "p2")
    with track_stage("prepare", params, ("balance",)):
        _, (_, running) = _runs(store, "pipeline")
        assert running.info.status == "RUNNING"
    _, (_, finished) = _runs(store, "pipeline")
    assert finished.info.status == "FINISHED"


def test_a_live_process_run_and_another_hosts_run_are_left_alone(store):
    client = mlflow.MlflowClient(tracking_uri=store)
    exp_id = client.create_experiment("visionops")
    mine = client.create_run(exp_id, tags=faults.owner_tags())
    other = client.create_run(exp_id, tags={**faults.owner_tags(), faults.HOST_TAG: "elsewhere", faults.PID_TAG: "1"})
    gone = client.create_run(exp_id, tags={**faults.owner_tags(), faults.PID_TAG: str(2**22 + 7)})
    reused = client.create_run(exp_id, tags={**faults.owner_tags(), faults.STARTED_TAG: "1000"})  # our pid, older process
    assert sorted(faults.end_orphans(client, exp_id)) == sorted([gone.info.run_id, reused.info.run_id])
    assert client.get_run(mine.info.run_id).info.status == "RUNNING"
    assert client.get_run(other.info.run_id).info.status == "RUNNING"


def test_a_live_owner_is_not_taken_for_gone_when_the_wall_clock_moves(monkeypatch):
    """psutil adds the boot time as the wall clock sees it now; an NTP step must not end a live process's runs."""
    psutil_linux = pytest.importorskip("psutil._pslinux")
    tags = faults.owner_tags()
    boot = psutil_linux.boot_time()
    monkeypatch.setattr(psutil_linux, "boot_time", lambda: boot + 1.0)
    assert not faults.owner_gone(tags)
    assert faults.owner_tags() == tags


@pytest.mark.parametrize(
    "before,logged,linked",
    [
        ({"distill": 15}, [("student alone", 1)], True),  # killed between the two students
        ({"distill": 3}, [("distill", 4), ("student alone", 1)], True),
        ({"distill": 3}, [("distill", 1)], False),  # the checkpoint did not match: a fresh start
        ({"distill": 15, "student alone": 15}, [], True),  # killed after the last epoch: nothing left to train
    ],
)
def test_resume_link_follows_the_training_loops(store, tmp_path, before, logged, linked):
    client = mlflow.MlflowClient(tracking_uri=store)
    exp_id = client.create_experiment("visionops")
    old, new = (client.create_run(exp_id).info.run_id for _ in range(2))
    (tmp_path / "ck").mkdir()
    (tmp_path / "ck" / "distill.mlflow.json").write_text(json.dumps({"run_id": old, "epochs": before}))
    link = faults.ResumeLink(client, "distill", new, tmp_path / "ck")
    for desc, epoch in logged:
        link.on_epoch(desc, epoch)
    link.on_end("FAILED")
    assert (client.get_run(new).data.tags.get(faults.RESUMED_FROM_TAG) == old) is linked
    sidecar = json.loads((tmp_path / "ck" / "distill.mlflow.json").read_text())
    assert sidecar["run_id"] == (new if logged else old)
    if linked and logged:
        assert sidecar["epochs"] == {**before, **dict(logged)}


@pytest.mark.parametrize("in_process", [True, False])
def test_a_failed_attempt_says_why_and_is_linked_to_its_retry(store, monkeypatch, in_process):
    """One pipeline run, one stage run twice (a retried Prefect task): the first FAILED with the error as its
    reason, each linked to the other, and the pipeline's parent FINISHED, since the retry stands for it."""
    monkeypatch.setenv(PIPELINE_RUN_ENV, "p1")
    params = Params.model_validate({"mlflow": {"tracking_uri": store}})
    with pytest.raises(RuntimeError):
        with track_stage("validate", params, ("validate",), in_process=in_process):
            raise RuntimeError("bad data in 3 images")
    _, (parent,) = _runs(store, "pipeline")
    assert parent.info.status == "FAILED"
    with track_stage("validate", params, ("validate",), in_process=in_process):
        pass
    _, (failed, retry) = _runs(store)
    assert failed.info.status == "FAILED" and retry.info.status == "FINISHED"
    assert failed.data.tags[faults.END_REASON_TAG] == "RuntimeError: bad data in 3 images"
    assert failed.data.tags[faults.RETRIED_BY_TAG] == retry.info.run_id
    assert retry.data.tags[faults.RETRY_OF_TAG] == failed.info.run_id and faults.END_REASON_TAG not in retry.data.tags
    _, (parent,) = _runs(store, "pipeline")
    assert parent.info.status == "FINISHED"

    monkeypatch.setenv(PIPELINE_RUN_ENV, "p2")  # another pipeline run: a first attempt, linked to nothing
    with track_stage("validate", params, ("validate",), in_process=in_process):
        pass
    _, runs = _runs(store)
    assert faults.RETRY_OF_TAG not in runs[-1].data.tags


# A stage process that opens its run, says so, and waits to be terminated.
TERMINATED_STAGE = """
import sys, time
from visionops.config import Params
from visionops.tracking.stage_run import track_stage
params = Params.model_validate({"mlflow": {"tracking_uri": sys.argv[1]}})
with track_stage("evaluate", params, ("evaluate",), in_process=IN_PROCESS) as run:
    if hasattr(run, "wait_open"):
        run.wait_open()
    print("open", flush=True)
    time.sleep(600)
"""


@pytest.mark.parametrize("in_process", [True, False])
def test_sigterm_to_the_process_group_ends_the_run_killed_at_once(store, tmp_path, in_process):
    """What a Prefect task timeout does (run_stage's SIGTERM to dvc's process group): the run ends KILLED, saying
    why, before the process dies of the signal; it does not wait, RUNNING, for the next stage to find it."""
    import signal

    script = tmp_path / "stage.py"
    script.write_text(TERMINATED_STAGE.replace("IN_PROCESS", str(in_process)))
    env = {**os.environ, PIPELINE_RUN_ENV: "p1", "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.Popen([sys.executable, str(script), store], cwd=tmp_path, env=env, stdout=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        assert proc.stdout.readline() == "open\n"
        os.killpg(proc.pid, signal.SIGTERM)  # the stage and, out of process, its helper
        assert proc.wait(timeout=60) == -signal.SIGTERM
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    _, (run,) = _runs(store)
    assert run.info.status == "KILLED" and "terminated by SIGTERM" in run.data.tags[faults.END_REASON_TAG]
    _, (parent,) = _runs(store, "pipeline")
    assert parent.info.status == "KILLED"
