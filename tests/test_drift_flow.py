"""The `drift` flow on Prefect's test harness with a real MLflow store and a real registered classifier: no window
on too few rows, a judged window logged as metrics and artifacts, and persistent drift starting the training
deployment with its cause (synthetic reference and log rows, whose shifts the tests set); then the whole loop
(slow): a shift served through `visionops predict`, the drift flow, the retraining run and its new version."""

from __future__ import annotations

import os
import shutil
import sys
import time
import types
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import yaml
from conftest import corner_images, train_quickly
from test_drift import log_rows

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from pipelines import deployments  # noqa: E402
from pipelines import drift as drift_flow  # noqa: E402
from visionops.monitoring.inference_log import to_table, write_file  # noqa: E402
from visionops.monitoring.served_log import LOG_URI_ENV  # noqa: E402
from visionops.serving.registered import WEIGHTS_SHA256_TAG  # noqa: E402

NAME = "visionops-classifier"  # params.yaml mlflow.teacher_model_name
CLASSES = ["top_left", "top_right", "bottom"]
MONITOR = {"min_window_rows": 50, "window_rows": 100, "windows_to_trigger": 2}


@pytest.fixture(scope="module")
def model_file(tmp_path_factory) -> Path:
    from visionops.data import dataset
    from visionops.tasks.classification import classifier

    labels = np.arange(240) % 3
    split = dataset.Split(corner_images(labels, np.random.default_rng(0)), labels, [f"{i}.png" for i in range(240)])
    path = tmp_path_factory.mktemp("model") / "teacher.pt"
    classifier.save(path, train_quickly("lenet", CLASSES, split, 0, 40), "lenet", CLASSES, (16, 16, 1))
    return path


def registered(root: Path, empty_db: Path, model_file: Path, alias: str):
    """`root` as a project (params.yaml with small windows) whose SQLite store has the classifier registered
    as `NAME` with `alias` and a synthetic reference profile (`log_rows`: its shifts are the tests' to set);
    returns the version."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from visionops.monitoring.reference import SCORE, Profile
    from visionops.monitoring.served_log import REFERENCE_ARTIFACT
    from visionops.serving.pyfunc import log_classifier

    root.mkdir()
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["monitor"].update(MONITOR)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    shutil.copy(empty_db, root / "mlflow.db")
    reference = log_rows(600, np.random.default_rng(0), classes=CLASSES)
    reference["time"], reference["request_id"], reference["row"] = pd.Timestamp("2025-12-31", tz="UTC"), "reference", 0
    table = to_table(reference.drop(columns=SCORE)).append_column(SCORE, pa.array(reference[SCORE], pa.float32()))
    pq.write_table(table, root / "reference.parquet")
    mlflow.set_tracking_uri(f"sqlite:///{root / 'mlflow.db'}")
    mlflow.set_experiment(experiment_id=mlflow.create_experiment("visionops", (root / "mlartifacts").as_uri()))
    with mlflow.start_run():
        profile = Profile({REFERENCE_ARTIFACT: str(root / "reference.parquet")}, params["monitor"])
        version = log_classifier(model_file, NAME, tags={}, alias=alias, profile=profile)
    mlflow.set_tracking_uri(None)
    return version


@pytest.fixture
def project(tmp_path, empty_db, model_file, monkeypatch, prefect_harness):
    """A project whose champion is the classifier."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv(LOG_URI_ENV, raising=False)
    root = tmp_path / "proj"
    version = registered(root, empty_db, model_file, "champion")
    params = yaml.safe_load((root / "params.yaml").read_text())
    return types.SimpleNamespace(path=root, sha256=version.tags[WEIGHTS_SHA256_TAG], version=str(version.version),
                                 log=root / params["monitor"]["log_uri"], start=pd.Timestamp("2026-01-01", tz="UTC"))


def serve(project, n: int, sha256: str | None = None, seed: int = 1, **shift) -> pd.Timestamp:
    """Write `n` log rows of the model (one second apart, after the last ones); returns the newest row's time."""
    rows = log_rows(n, np.random.default_rng(seed), classes=CLASSES, **shift).drop(columns="score")
    rows["time"] = project.start + pd.to_timedelta(np.arange(1, n + 1), unit="s")
    rows["request_id"], rows["row"] = f"r{seed}", np.arange(n)
    rows["model_name"], rows["model_sha256"], rows["task"] = NAME, sha256 or project.sha256, "classification"
    write_file(str(project.log), to_table(rows))
    project.start = rows["time"].max()
    return project.start


def run_flow(project) -> dict:
    state = drift_flow.drift(project_dir=str(project.path), return_state=True)
    assert state.is_completed(), state.message
    return state.result() | {"flow_run_id": str(state.state_details.flow_run_id)}


def client() -> mlflow.MlflowClient:
    return mlflow.MlflowClient()


def drift_runs(project) -> list:
    experiment = client().get_experiment_by_name(drift_flow.EXPERIMENT)
    return [] if experiment is None else client().search_runs([experiment.experiment_id])


def artifact_markdown(flow_run_id: str) -> str:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey, FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as c:
        (found,) = c.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[drift_flow.DRIFT_ARTIFACT])),
                                    flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    return found.data


def test_too_few_new_rows_make_no_window(project):
    serve(project, 30)
    serve(project, 200, sha256="0" * 64)  # another version's rows do not count
    project.start = pd.Timestamp.now(tz="UTC")
    serve(project, 100)  # nor rows of the last 2 x monitor.flush_seconds (others may still be on their way)
    summary = run_flow(project)
    assert summary["window"] is None and summary["new_rows"] == 30
    assert "monitor.min_window_rows 50" in summary["reason"]
    assert "monitor.min_window_rows 50" in artifact_markdown(summary["flow_run_id"])
    (run,) = drift_runs(project)
    assert run.data.metrics == {} and drift_flow.WINDOW_END_TAG not in run.data.tags


def test_a_window_is_logged_as_metrics_report_and_history_then_the_next_starts_after_it(project, tmp_path):
    serve(project, 40, seed=1)
    end = serve(project, 100, seed=2)
    first = run_flow(project)
    assert first["window"] == 0 and first["verdict"] == "no drift" and first["new_rows"] == 140
    assert first["metrics"]["n_window"] == 100  # the newest window_rows of them
    (run,) = drift_runs(project)
    assert run.data.tags[drift_flow.MODEL_TAG] == NAME and run.data.tags[drift_flow.VERSION_TAG] == project.version
    assert run.data.tags[drift_flow.WINDOW_END_TAG] == end.isoformat() == first["window_end"]
    assert run.data.metrics["drifted"] == 0.0 and 0 < run.data.metrics["embedding_mmd.p_value"] <= 1
    report = f"windows/{drift_flow.window_name(end)}.html"
    assert first["report"] == report
    html = Path(client().download_artifacts(run.info.run_id, report, str(tmp_path))).read_text()
    assert "no drift" in html and html.count("data:image/png;base64,") == 3
    assert drift_flow.HISTORY_CHART in [a.path for a in client().list_artifacts(run.info.run_id)]
    text = artifact_markdown(first["flow_run_id"])
    assert "# Drift: no drift" in text and run.info.run_id in text and report in text

    assert run_flow(project)["window"] is None  # nothing new since the window's end
    serve(project, 80, seed=3, brightness=0.3, shift=0.5)
    second = run_flow(project)
    assert second["window"] == 1 and second["verdict"] == "DRIFTED" and second["new_rows"] == 80
    assert second["trigger"] == {"triggered": False, "reason": "1 drifted window(s) in a row; 2 start retraining"}
    history = client().get_metric_history(run.info.run_id, "drifted")
    assert [(m.step, m.value) for m in history] == [(0, 0.0), (1, 1.0)]
    assert [m.step for m in client().get_metric_history(run.info.run_id, "brightness_ks.p_value")] == [0, 1]


def test_persistent_drift_runs_the_training_deployment_once_with_its_cause(project):
    from prefect.client.orchestration import get_client

    deployments.register(project.path)  # applied without a work pool: its runs stay scheduled
    serve(project, 60, seed=4, shift=0.5)
    assert not run_flow(project)["trigger"]["triggered"]
    serve(project, 60, seed=5, shift=0.5)
    second = run_flow(project)
    trigger = second["trigger"]
    assert trigger["triggered"], trigger
    (run,) = drift_runs(project)
    assert trigger["cause"] == f"drift:{run.info.run_id}"
    assert run.data.tags[drift_flow.TRIGGERED_TAG] == trigger["flow_run_id"]
    with get_client(sync_client=True) as c:
        flow_run = c.read_flow_run(trigger["flow_run_id"])
        deployment = c.read_deployment(flow_run.deployment_id)
    assert deployment.name == "nightly" and flow_run.state.is_scheduled()
    assert flow_run.parameters == {"project_dir": str(project.path), "refresh_data": True, "promote": True,
                                   "cause": trigger["cause"]}
    assert trigger["flow_run_id"] in artifact_markdown(second["flow_run_id"])

    serve(project, 60, seed=6, shift=0.5)
    third = run_flow(project)  # still drifting, but the retraining it started has not run yet
    assert third["verdict"] == "DRIFTED" and not third["trigger"]["triggered"]
    assert f"training flow run {trigger['flow_run_id']} started by this drift is still Scheduled" == third["trigger"]["reason"]


def test_the_drift_deployment_runs_hourly_on_the_params_cron(tmp_path):
    (tmp_path / "params.yaml").write_text((ROOT / "params.yaml").read_text())
    built = {d.name: d for d in deployments.build_deployments(tmp_path)}
    assert set(built) == {"nightly", "manual", "daily", "hourly"}
    hourly = built["hourly"]
    assert hourly.entrypoint == "pipelines.drift.drift" and hourly.parameters == {"project_dir": str(tmp_path)}
    schedule = yaml.safe_load((ROOT / "params.yaml").read_text())["schedule"]
    assert hourly.schedules[0].schedule.cron == schedule["drift_cron"]


def test_the_training_runs_cause_is_tagged_on_the_versions_its_promotion_judged(tmp_path, empty_db, model_file,
                                                                                 monkeypatch):
    """The real promotion of a registered challenger on a frozen holdout, with the training flow's `cause`."""
    from pipelines import flows
    from visionops.data import dataset

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    root = tmp_path / "proj"
    version = registered(root, empty_db, model_file, "challenger")
    labels = np.arange(60) % 3
    split = dataset.Split(corner_images(labels, np.random.default_rng(1)), labels, [f"h{i}.png" for i in range(60)])
    dataset.save(dataset.Dataset(CLASSES, {"holdout": split}, "synthetic"), root / flows.HOLDOUT)
    outcomes = flows.promote_all(root, cause="drift:abc123")
    assert [(o["role"], o["challenger_version"]) for o in outcomes] == [("teacher", str(version.version)), ("student", None)]
    tags = client().get_model_version(NAME, version.version).tags
    assert tags[flows.CAUSE_TAG] == "drift:abc123" and tags["promotion.decision"] == outcomes[0]["outcome"]


# ------------------------------------------------------------------------------------------
# end to end: a shift served through `visionops predict`, the drift flow, the retraining it starts


def digits_folder(root: Path, start: int, stop: int) -> Path:
    """scikit-learn's digits `start:stop` as an ImageFolder tree root/<digit>/<index>.png (8 x 8 greyscale)."""
    import gzip

    from PIL import Image

    from visionops.data.sources.digits import digits_file

    with gzip.open(digits_file(), "rt") as fh:
        data = np.loadtxt(fh, delimiter=",")
    for i in range(start, stop):
        folder = root / str(int(data[i, -1]))
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.round(data[i, :-1].reshape(8, 8) * 255 / 16).astype(np.uint8)).save(folder / f"{i}.png")
    return root


def noisy_pngs(project, out: Path, sigma: float, seed: int, n: int = 60) -> Path:
    """`n` test images of the project's dataset with Gaussian noise of `sigma` (0-255 scale), as PNG files."""
    from PIL import Image

    from visionops.data import dataset

    test = dataset.load(project.path / "data/dataset").splits["test"]
    rng = np.random.default_rng(seed)
    out.mkdir(parents=True)
    for i, image in enumerate(np.asarray(test.images[:n])[..., 0]):
        noisy = np.clip(image + rng.normal(0, sigma, image.shape), 0, 255).astype(np.uint8)
        Image.fromarray(noisy).save(out / f"{i}.png")
    return out


@pytest.mark.slow
def test_a_shift_served_through_predict_retrains_and_the_new_version_carries_the_cause(tmp_path, prefect_harness,
                                                                                       monkeypatch):
    """The training flow makes v1 champion (with its reference); noisy digits go through `predict_paths` (the
    served model logs them); two drifted windows run the training deployment, whose flow run is executed here
    (`prefect flow-run execute`, as a worker would) after `visionops import-labels` added labelled images to the
    source: v2 appears, judged by the gates, tagged with the drift's cause."""
    import subprocess

    from pipeline_project import Project
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL
    from test_flows import FAST

    from pipelines import flows
    from visionops.serving.promotion import predict_paths

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    source = digits_folder(tmp_path / "source", 0, 1200)
    project = Project(tmp_path / "proj")
    project.set_params(**FAST, data={"source": "folder", "root": str(source), "near_duplicate_hash": "none"},
                       monitor={**MONITOR, "flush_seconds": 0.2})
    project.run("git", "add", "-A")
    project.run("git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "folder source")
    first = flows.training(project_dir=str(project.path), return_state=True)
    assert first.is_completed(), first.message
    client = mlflow.MlflowClient(f"sqlite:///{project.path / 'mlflow.db'}")
    champion = client.get_model_version_by_alias(NAME, "champion")
    monkeypatch.setenv(LOG_URI_ENV, str(project.path / "logs" / "inference"))
    deployments.register(project.path)

    for window, sigma in enumerate((60.0, 80.0)):
        mlflow.set_tracking_uri(f"sqlite:///{project.path / 'mlflow.db'}")
        images = noisy_pngs(project, tmp_path / f"noisy{window}", sigma, seed=window)
        predict_paths(f"models:/{NAME}@champion", [images], tmp_path / f"predictions{window}.csv")
        time.sleep(0.5)  # past 2 x monitor.flush_seconds: the drift flow reads these rows
        summary = drift_flow.drift(project_dir=str(project.path))
        assert summary["window"] == window and summary["verdict"] == "DRIFTED", summary
    trigger = summary["trigger"]
    assert trigger["triggered"], trigger

    project.run("visionops", "import-labels", str(digits_folder(tmp_path / "labelled", 1200, 1797)))  # newest data
    env = {**project.env(), "PREFECT_API_URL": PREFECT_API_URL.value(),
           "PYTHONPATH": os.pathsep.join([str(ROOT), str(project.path / "src")])}
    out = subprocess.run([sys.executable, "-m", "prefect", "flow-run", "execute", trigger["flow_run_id"]],
                         cwd=ROOT, env=env, capture_output=True, text=True)
    assert out.returncode == 0, (out.stdout + out.stderr)[-4000:]
    with get_client(sync_client=True) as c:
        assert c.read_flow_run(trigger["flow_run_id"]).state.is_completed()
    versions = {v.version: v for v in client.search_model_versions(f"name = '{NAME}'")}
    new = max(versions, key=int)
    assert int(new) > int(champion.version)
    tags = versions[new].tags
    assert tags[flows.CAUSE_TAG] == trigger["cause"] == f"drift:{summary['mlflow_run_id']}"
    assert tags["promotion.decision"] in ("promoted", "rejected")
