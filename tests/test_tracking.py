"""MLflow tracking around the real pipeline: grouping, lineage tags, curves, artifacts, concurrency, server."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from pipeline_project import Project

from visionops.data import dataset
from visionops.serving.pyfunc import encode_png
from visionops.tasks.classification import classifier
from visionops.tracking.lineage import data_version
from visionops.tracking.stage_run import DEPS_ARTIFACT
from visionops.tracking.store import project_root

FAST = dict(train={"epochs": 2}, distill={"epochs": 1, "baseline": False}, evaluate={"gradcam_samples": 2})
STAGES = ("download", "validate", "label_issues", "prepare", "train", "evaluate", "baseline", "distill", "register")


def _client(project) -> mlflow.MlflowClient:
    return mlflow.MlflowClient(tracking_uri=f"sqlite:///{project.path / 'mlflow.db'}")


def _runs(project, filter_string=""):
    client = _client(project)
    exp = client.get_experiment_by_name("visionops")
    return client.search_runs([exp.experiment_id], filter_string, max_results=1000) if exp else []


def _deps(project, run) -> dict[str, str]:
    """The run's dependencies and their hashes as DVC saw them (its dvc_deps.json artifact)."""
    path = _client(project).download_artifacts(run.info.run_id, DEPS_ARTIFACT, str(project.path.parent))
    return json.loads(Path(path).read_text())


@pytest.fixture(scope="module")
def tracked(tmp_path_factory):
    project = Project(tmp_path_factory.mktemp("tracked") / "proj")
    project.set_params(**FAST)
    project.repro()
    return project


def test_store_paths_survive_dvc_temp_workspaces(tmp_path):
    assert project_root(tmp_path) == tmp_path.resolve()
    inside = tmp_path / ".dvc" / "tmp" / "exps" / "tmpabc123"
    assert project_root(inside) == tmp_path.resolve()


def test_background_run_logs_the_result_and_fails_with_the_stage(tmp_path, monkeypatch):
    """A stage that logs only its result has its run kept by a helper process (BackgroundRun)."""
    from visionops.config import Params
    from visionops.tracking.stage_run import BackgroundRun, track_stage

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    params = Params.model_validate({"mlflow": {"tracking_uri": uri}})
    reports = tmp_path / "reports" / "prepare"
    reports.mkdir(parents=True)
    (reports / "summary.json").write_text("{}")
    with track_stage("prepare", params, ("balance",), in_process=False) as run:
        assert isinstance(run, BackgroundRun)
        run.wait_open()
        run.log_result({"train_images_after": 7, "strategy": "none"}, reports)
    with pytest.raises(RuntimeError, match="bad data"):
        with track_stage("validate", params, ("validate",), in_process=False) as run:
            run.log_result({"success": 0})
            raise RuntimeError("bad data")
    client = mlflow.MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("visionops")
    runs = {r.data.tags["visionops.stage"]: r for r in client.search_runs([exp.experiment_id], "tags.`visionops.role` = 'stage'")}
    prepare, validate = runs["prepare"], runs["validate"]
    assert prepare.info.status == "FINISHED" and prepare.data.metrics == {"train_images_after": 7.0}
    assert prepare.data.params["balance.strategy"] == "none"
    assert [f.path for f in client.list_artifacts(prepare.info.run_id, "prepare")] == ["prepare/summary.json"]
    assert validate.info.status == "FAILED" and validate.data.metrics == {"success": 0.0}


@pytest.mark.slow
def test_every_stage_is_a_run_grouped_under_its_pipeline(tracked):
    runs = _runs(tracked)
    stages = {r.data.tags.get("visionops.stage"): r for r in runs if r.data.tags.get("visionops.role") == "stage"}
    assert set(stages) == set(STAGES)
    parents = [r for r in runs if r.data.tags.get("visionops.role") == "pipeline"]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    pid = parents[0].data.tags["visionops.pipeline_run_id"]
    assert pid.startswith("dvc-")
    commit = tracked.run("git", "rev-parse", "HEAD").stdout.strip()
    parent_name = parents[0].info.run_name  # readable: what ran, on which commit, when
    assert parent_name.startswith(f"dvc repro {commit[:7]} 20"), parent_name
    for name, run in stages.items():
        tags = run.data.tags
        assert tags["mlflow.parentRunId"] == parents[0].info.run_id, name
        assert tags["visionops.pipeline_run_id"] == pid and tags["git.commit"] == commit
        assert run.info.run_name == f"{name} · {parent_name}" and tags["visionops.pipeline_name"] == parent_name
        # the pipeline's own outputs (reports, committed metrics, dvc.lock) do not make the tree dirty
        assert tags["git.dirty"] == "false" and run.info.status == "FINISHED"
        deps = _deps(tracked, run)  # one artifact, not a tag per dependency
        assert deps and tags["dvc.data_version"] == data_version(deps), name
        assert not [k for k in tags if k.startswith("dvc.dep")], name
    lock = (tracked.path / "dvc.lock").read_text()
    assert _deps(tracked, stages["train"])["data/dataset"] in lock  # the same hash DVC recorded
    assert stages["train"].data.params["train.epochs"] == "2"
    assert stages["download"].data.params["data.source"] == "digits"


@pytest.mark.slow
def test_curves_metrics_artifacts_and_dataset(tracked):
    client = _client(tracked)
    by_stage = {r.data.tags["visionops.stage"]: r for r in _runs(tracked, "tags.`visionops.role` = 'stage'")}
    train = by_stage["train"]
    history = client.get_metric_history(train.info.run_id, "val_acc")
    assert [m.step for m in history] == [1, 2]
    assert train.data.metrics["best_val_acc"] == max(m.value for m in history)
    assert "accuracy" in by_stage["evaluate"].data.metrics and "student_acc" in by_stage["distill"].data.metrics
    evaluate_files = {f.path for f in client.list_artifacts(by_stage["evaluate"].info.run_id, "evaluate")}
    assert {"evaluate/report.md", "evaluate/report.html", "evaluate/figures"} <= evaluate_files
    figures = {f.path for f in client.list_artifacts(by_stage["evaluate"].info.run_id, "evaluate/figures")}
    assert {f"evaluate/figures/{n}.png" for n in ("per_class_accuracy", "gradcam_correct", "reliability")} <= figures
    label_files = {f.path for f in client.list_artifacts(by_stage["label_issues"].info.run_id, "label_issues")}
    assert {"label_issues/issues.csv", "label_issues/gallery.png", "label_issues/metrics.json"} <= label_files
    assert by_stage["label_issues"].data.metrics["train_images"] > 0 and "label_issues" in by_stage["label_issues"].data.metrics
    validate_files = {f.path for f in client.list_artifacts(by_stage["validate"].info.run_id, "validate")}
    assert {"validate/summary.json", "validate/data_docs"} <= validate_files
    inputs = train.inputs.dataset_inputs
    assert len(inputs) == 1
    source = json.loads(inputs[0].dataset.source)
    assert inputs[0].dataset.source_type == "dvc" and source["md5"] == _deps(tracked, train)["data/dataset"]
    note = train.data.tags["mlflow.note.content"]  # the run's description says what its timings measure
    assert "train_seconds" in note and "validation pass" in note
    assert "mlflow.note.content" in by_stage["distill"].data.tags and "mlflow.note.content" not in by_stage["evaluate"].data.tags


@pytest.mark.slow
def test_stage_restored_from_dvc_cache_logs_no_run(tracked):
    before = len(_runs(tracked))
    tracked.set_params(evaluate={"gradcam_samples": 3})
    tracked.repro("evaluate")
    after_change = len(_runs(tracked))
    assert after_change == before + 2  # a new pipeline parent and the evaluate run
    tracked.set_params(evaluate={"gradcam_samples": 2})
    out = tracked.repro("evaluate")
    assert "Running stage 'evaluate'" not in out.stdout  # restored from DVC's run cache
    assert len(_runs(tracked)) == after_change


@pytest.mark.slow
def test_two_pipelines_at_once_share_one_store_without_losing_runs(tmp_path):
    """Two projects (like two `dvc exp run --temp` workspaces) track into the same SQLite store concurrently."""
    store = tmp_path / "shared.db"
    projects = [Project(tmp_path / f"p{i}") for i in range(2)]
    for p in projects:
        p.set_params(mlflow={"tracking_uri": f"sqlite:///{store}?timeout=60"}, **FAST)
    procs = [
        subprocess.Popen(["dvc", "repro", "prepare"], cwd=p.path, env=p.env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for p in projects
    ]
    outs = [proc.communicate(timeout=600)[0] for proc in procs]
    for proc, out in zip(procs, outs):
        assert proc.returncode == 0, out
        assert "database is locked" not in out
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{store}")
    exp = client.get_experiment_by_name("visionops")
    runs = client.search_runs([exp.experiment_id], "tags.`visionops.role` = 'stage'", max_results=100)
    assert len(runs) == 8  # download, validate, label_issues and prepare of each
    assert len({r.data.tags["visionops.pipeline_run_id"] for r in runs}) == 2


def model_classes(project) -> list[str]:
    return dataset.load(project.path / "data" / "dataset").class_names


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serve_and_classify(model_uri: str, env: dict, cwd, png_b64: str) -> dict:
    """Serve `model_uri` with the real `mlflow models serve` and classify one PNG through /invocations."""
    port = _free_port()
    env = {**env, "PATH": f"{os.path.dirname(sys.executable)}{os.pathsep}{env['PATH']}"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "models", "serve", "-m", model_uri, "--env-manager", "local",
         "-h", "127.0.0.1", "-p", str(port)],
        env=env, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    try:
        deadline = time.time() + 180
        while True:
            assert proc.poll() is None, "mlflow models serve exited"
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2)
                break
            except OSError:
                assert time.time() < deadline, "mlflow models serve did not answer /ping"
                time.sleep(0.5)
        body = json.dumps({"dataframe_split": {"columns": ["image"], "data": [[png_b64]]}}).encode()
        req = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", body, {"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=60) as resp:
            return json.loads(resp.read())["predictions"][0]
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)


@pytest.mark.slow
def test_stage_logs_to_a_real_mlflow_server(tmp_path):
    port = _free_port()
    server = subprocess.Popen(
        [os.path.join(os.path.dirname(sys.executable), "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port),
         "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}", "--artifacts-destination", str(tmp_path / "art")],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        uri = f"http://127.0.0.1:{port}"
        deadline = time.time() + 120
        while True:
            try:
                mlflow.MlflowClient(tracking_uri=uri).search_experiments()
                break
            except Exception:
                assert time.time() < deadline, "mlflow server did not start"
                time.sleep(0.5)
        project = Project(tmp_path / "proj")
        project.set_params(**FAST)
        env = {**project.env(), "MLFLOW_TRACKING_URI": uri}
        out = subprocess.run(["visionops", "download"], cwd=project.path, env=env, capture_output=True, text=True)
        assert out.returncode == 0, out.stderr
        client = mlflow.MlflowClient(tracking_uri=uri)
        exp = client.get_experiment_by_name("visionops")
        (run,) = client.search_runs([exp.experiment_id], "tags.`visionops.stage` = 'download'")
        assert run.data.params["data.source"] == "digits" and run.data.metrics["classes"] == 10
        assert not (project.path / "mlflow.db").exists()

        # the pipeline against the server (the register stage registers), then serve the teacher and send it a real PNG
        out = subprocess.run(["dvc", "repro", "register"], cwd=project.path, env=env, capture_output=True, text=True)
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
        (version,) = client.search_model_versions("name = 'visionops-classifier'")
        test = dataset.load(project.path / "data" / "dataset").splits["test"]
        model, _ = classifier.load(project.path / "models" / "teacher.pt")
        expected = int(classifier.predict_logits(model, test.images[:1], torch.device("cpu")).argmax(1)[0])
        png = encode_png(np.asarray(test.images[0]))
        served = _serve_and_classify(f"models:/visionops-classifier/{version.version}", env, project.path, png)
        assert served["label"] == model_classes(project)[expected]
    finally:
        server.terminate()
        server.wait(timeout=30)


@pytest.mark.slow
def test_kill_9_during_train_then_repro_leaves_no_running_run_and_links_the_resume(tmp_path):
    import psutil

    project = Project(tmp_path / "proj")
    project.set_params(data={"image_size": 16}, train={"model": "resnet20", "epochs": 8, "batch_size": 32})
    project.repro("prepare")
    sidecar = project.path / "models" / "checkpoints" / "train.mlflow.json"
    proc = subprocess.Popen(["dvc", "repro", "train"], cwd=project.path, env=project.env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 240
        while not sidecar.exists():  # written just after the epoch's checkpoint
            assert proc.poll() is None, "train ended before its first checkpoint"
            assert time.time() < deadline, "no checkpoint after 240 s"
            time.sleep(0.05)
        (stage,) = [p for p in psutil.Process(proc.pid).children(recursive=True)
                    if any(os.path.basename(c) == "visionops" for c in p.cmdline()[:2])]
        time.sleep(0.3)  # mid-epoch
        stage.send_signal(signal.SIGKILL)  # the stage only: dvc sees it die and stops
        assert proc.wait(timeout=120) != 0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    (orphan,) = _runs(project, "attributes.status = 'RUNNING' and tags.`visionops.role` = 'stage'")
    assert orphan.data.tags["visionops.stage"] == "train"  # kill -9 left it RUNNING

    project.repro("train")
    client = _client(project)
    assert _runs(project, "attributes.status = 'RUNNING'") == []
    killed = client.get_run(orphan.info.run_id)
    assert killed.info.status == "KILLED" and "killed or crashed" in killed.data.tags["visionops.end_reason"]
    (resumed,) = [r for r in _runs(project, "tags.`visionops.stage` = 'train'") if r.info.run_id != killed.info.run_id]
    assert resumed.info.status == "FINISHED"
    assert resumed.data.tags["visionops.resumed_from"] == killed.info.run_id
    assert killed.data.tags["visionops.resumed_by"] == resumed.info.run_id
    before = [m.step for m in client.get_metric_history(killed.info.run_id, "val_acc")]
    after = [m.step for m in client.get_metric_history(resumed.info.run_id, "val_acc")]
    assert before == list(range(1, len(before) + 1)) and after == list(range(after[0], 9))
    assert after[0] - 1 in (len(before), len(before) + 1)  # from the last checkpoint (its epoch may be unlogged)
    parents = {r.info.run_id: r.info.status for r in _runs(project, "tags.`visionops.role` = 'pipeline'")}
    assert parents[killed.data.tags["mlflow.parentRunId"]] == "KILLED"
    assert parents[resumed.data.tags["mlflow.parentRunId"]] == "FINISHED"
    assert list(parents.values()).count("FINISHED") == 2  # prepare's pipeline, and the resumed one
