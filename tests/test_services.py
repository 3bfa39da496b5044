"""The scale-out services for real, on loopback: PostgreSQL, SeaweedFS (S3), the MLflow and Prefect servers and
two process workers, started as `make services` starts them (infra/services.py), on tiny digits pipelines.

One module-scoped set of servers; the tests run in order on it and the last one stops everything and checks
that no process is left behind.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest
from pipeline_project import Project

ROOT = Path(__file__).resolve().parents[1]
for p in (ROOT, ROOT / "infra"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

import services as svc  # noqa: E402  (infra/services.py)
from test_flows import FAST, WITH_RUNS  # noqa: E402

pytestmark = [pytest.mark.services, pytest.mark.slow]
TEACHER = "visionops-classifier"
RUN_TIMEOUT_S = 900
PS_LINES: set[str] = set()  # every command line `ps` showed while the tests waited on flow runs


def _need(*modules: str) -> None:
    """Skip without the scale extra or PostgreSQL; fail instead where CI requires them (.ci/run)."""
    import importlib.util

    missing = [f"python module {m} (pip install -e '.[scale]')" for m in modules if importlib.util.find_spec(m) is None]
    if not (svc.PG_BIN / "initdb").exists():
        missing.append(f"PostgreSQL 15 ({svc.PG_BIN}/initdb: apt-get install postgresql)")
    if missing:
        (pytest.fail if os.environ.get("VISIONOPS_REQUIRE_SERVICES") else pytest.skip)("missing: " + ", ".join(missing))


def _commit(project: Project, message: str) -> None:
    project.run("git", "add", "-A")
    project.run("git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", message, check=False)


def _env(services: svc.Services, cwd: Path) -> dict[str, str]:
    return {**os.environ, **services.client_env(), "PATH": f"{svc.BIN}{os.pathsep}{os.environ['PATH']}",
            "PYTHONPATH": str(cwd / "src"), "DVC_NO_ANALYTICS": "1", "GX_ANALYTICS_ENABLED": "false",
            "PREFECT_HOME": str(services.dir / "prefect")}


def _run(services, cwd: Path, *cmd: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=cwd, env=_env(services, cwd), capture_output=True, text=True, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    return proc


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    """Two projects, and the services (2 workers) with deployments registered for the first."""
    _need("psycopg2", "boto3", "s3fs", "dvc_s3")
    base = tmp_path_factory.mktemp("services")
    projects = [Project(base / name) for name in ("a", "b")]
    for seed, project in enumerate(projects):
        # training is deterministic and registration idempotent by file content: another seed, another model
        project.set_params(**{**FAST, "train": {**FAST["train"], "seed": seed}})
        _commit(project, "fast params")
    # PostgreSQL runs as `postgres`: its directory must be reachable, and pytest's tmp dirs are root-only
    svc_dir = Path(tempfile.mkdtemp(prefix="visionops-services-"))
    svc_dir.chmod(0o711)
    services = svc.Services(svc_dir, project=projects[0].path)
    t0 = time.monotonic()
    services.start(workers=2)
    services.start_seconds = time.monotonic() - t0
    from prefect.settings import PREFECT_API_URL, temporary_settings

    try:
        with temporary_settings(updates={PREFECT_API_URL: services.client_env()["PREFECT_API_URL"]}):
            yield services, projects
    finally:
        services.stop()
        shutil.rmtree(svc_dir, ignore_errors=True)


def _flow_run(flow_run_id: str):
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        return client.read_flow_run(flow_run_id)


def _ps_args() -> list[str]:
    """Every process's full command line, as `ps` shows it to anyone (-ww: not cut at the terminal's width)."""
    return subprocess.run(["ps", "-ww", "-eo", "args"], capture_output=True, text=True, check=True).stdout.splitlines()


def _wait_final(ids: list[str]) -> list:
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while True:
        PS_LINES.update(_ps_args())  # the stages' processes (dvc, visionops, the tracking helper) live only now
        runs = [_flow_run(i) for i in ids]
        if all(r.state and r.state.is_final() for r in runs):
            return runs
        assert time.monotonic() < deadline, [f"{r.id}: {r.state}" for r in runs]
        time.sleep(2)


def test_sigv4_is_enforced(stack):
    import botocore.exceptions

    services, _ = stack
    assert set(svc.BUCKETS) == {"mlflow", "dvc", "inference"} <= {b["Name"] for b in services.s3_client().list_buckets()["Buckets"]}
    with pytest.raises(botocore.exceptions.ClientError) as err:
        services.s3_client(secret="not-the-secret").list_buckets()
    assert err.value.response["Error"]["Code"] in {"SignatureDoesNotMatch", "AccessDenied", "InvalidAccessKeyId"}
    env = services.env_file.read_text()
    assert "MLFLOW_TRACKING_URI=" in env and "PREFECT_API_URL=" in env and oct(services.env_file.stat().st_mode)[-3:] == "600"


LOG_THROUGH_ENV_FILE = """
import json, sys, pandas as pd
from visionops.monitoring.inference_log import LogWriter, read_log, read_status
w = LogWriter.from_settings({"log_uri": sys.argv[1], "flush_rows": 10, "sample_images": 1.0})
frame = pd.DataFrame({"time": pd.Timestamp.now(tz="UTC"), "request_id": "s3req", "row": range(25)})
w.write(frame, raw=[b"\\x89PNG\\r\\n\\x1a\\n"] * 25)
w.close()
print(json.dumps({"stats": w.stats, "rows": sorted(read_log(sys.argv[1]).row.tolist()), "status": read_status(sys.argv[1])}))
"""


def test_the_inference_log_goes_to_its_bucket_with_the_env_file_alone(stack, tmp_path):
    """`source .services/env` is all a served model needs to log to s3://inference/log: a process with only that
    (no AWS setting of its own) writes rows, a sampled image and its status there, and reads the rows back."""
    services, _ = stack
    env_file = svc._read_env_file(services.env_file)
    uri = env_file["VISIONOPS_LOG_URI"]
    assert uri == "s3://inference/log"
    env = {**{k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "MLFLOW_S3"))}, **env_file,
           "PYTHONPATH": str(ROOT / "src")}
    proc = subprocess.run([sys.executable, "-c", LOG_THROUGH_ENV_FILE, uri], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = json.loads(proc.stdout)
    assert out["stats"]["rows_written"] == 25 and out["stats"]["files"] == 3 and out["stats"]["write_errors"] == 0
    assert out["rows"] == list(range(25)) and out["status"][0]["rows_written"] == 25
    keys = [o["Key"] for o in services.s3_client().list_objects_v2(Bucket="inference").get("Contents", [])]
    assert sum(k.startswith("log/day=") and k.endswith(".parquet") for k in keys) == 3, keys
    samples = sorted(k.rsplit("/", 1)[1] for k in keys if k.startswith("log/samples/day=") and not k.endswith("/"))
    assert samples == sorted(f"s3req-{i}.png" for i in range(25)), keys  # "/": pyarrow's folder markers
    assert any(k.startswith("log/_status/") and k.endswith(".json") for k in keys), keys


def test_two_workers_run_two_training_deployments_at_once(stack):
    """training/nightly for project a and for project b, at once, on two process workers of one pool."""
    from prefect.deployments import run_deployment

    services, projects = stack
    ids = [str(run_deployment("training/nightly", parameters={"project_dir": str(p.path), "refresh_data": False},
                              timeout=0).id) for p in projects]
    runs = _wait_final(ids)
    logs = {n: (services.logs / f"{n}.log").read_text() for n in ("worker-1", "worker-2")}
    for run in runs:
        assert run.state.is_completed(), f"{run.id}: {run.state.message}\n" + "\n".join(v[-3000:] for v in logs.values())
    # what the later tests build on, kept before the checks below so that one failure does not cascade
    services.flow_run_ids = ids
    for project in projects:
        _commit(project, "trained")
    # both started before either finished, each on its own worker
    assert runs[0].start_time < runs[1].end_time and runs[1].start_time < runs[0].end_time
    # both workers may poll the same run; the server lets one move it to Pending (the other logs "Aborted
    # submission"), and only that worker labels the run with its name
    takers = [run.labels.get("prefect.worker.name") for run in runs]
    assert set(takers) == {"worker-1", "worker-2"}, takers
    for run_id, taker in zip(ids, takers):
        assert run_id in logs[taker], (run_id, taker)
    for name in ("worker-1", "worker-2", "mlflow", "prefect"):
        assert "database is locked" not in (services.logs / f"{name}.log").read_text()


def test_mlflow_on_postgres_has_every_stage_and_both_models(stack):
    import mlflow

    services, projects = stack
    assert services.client_env()["MLFLOW_TRACKING_URI"].startswith("http://127.0.0.1:")
    client = mlflow.MlflowClient(services.client_env()["MLFLOW_TRACKING_URI"])
    experiments = [e.experiment_id for e in client.search_experiments()]
    run_ids = []
    for flow_run_id in services.flow_run_ids:
        runs = client.search_runs(experiments, f"tags.`prefect.flow_run_id` = '{flow_run_id}' and tags.`visionops.role` = 'stage'")
        # a stage Prefect retried (under load, say) leaves its first attempt linked to the retry and ended with why
        retried = [r for r in runs if "visionops.retried_by" in r.data.tags]
        assert all(r.info.status in ("FAILED", "KILLED") and r.data.tags.get("visionops.end_reason") for r in retried)
        runs = [r for r in runs if "visionops.retried_by" not in r.data.tags]
        assert sorted(r.data.tags["visionops.stage"] for r in runs) == sorted(WITH_RUNS)
        assert {r.data.tags["visionops.pipeline_run_id"] for r in runs} == {f"prefect-{flow_run_id}"}
        run_ids += [r.info.run_id for r in runs]
    versions = client.search_model_versions(f"name = '{TEACHER}'")
    assert len(versions) == 2 and {v.run_id for v in versions} <= set(run_ids)

    # the store is PostgreSQL: the rows are in the `mlflow` database
    with services.pg_connect("mlflow") as conn, conn.cursor() as cur:
        cur.execute("SELECT count(*) FROM model_versions WHERE name = %s", (TEACHER,))
        assert cur.fetchone()[0] == 2

    # artifacts and the registered models are objects in the SeaweedFS bucket, written through the server's proxy
    s3 = services.s3_client()
    keys = [o["Key"] for page in s3.get_paginator("list_objects_v2").paginate(Bucket="mlflow") for o in page.get("Contents", [])]
    assert any(f"/{r}/artifacts/" in k for r in run_ids for k in keys)  # the stage runs' artifacts
    for v in versions:
        location = client.get_model_version_download_uri(TEACHER, v.version)
        assert location.startswith("mlflow-artifacts:/"), location  # through the server's proxy
        prefix = location.removeprefix("mlflow-artifacts:").strip("/")
        assert f"{prefix}/MLmodel" in keys, (location, [k for k in keys if "MLmodel" in k])


def test_dvc_push_then_pull_into_a_fresh_clone(stack, tmp_path):
    services, projects = stack
    a = projects[0].path
    _run(services, a, "dvc", "push")
    assert services.s3_client().list_objects_v2(Bucket="dvc").get("KeyCount", 0) > 0
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(a), str(clone)], check=True)
    services.configure_dvc(clone)
    _run(services, clone, "dvc", "pull")
    status = json.loads(_run(services, clone, "dvc", "status", "--json").stdout)
    always = {"register": ["always changed"], "resolve_init": ["always changed"]}
    assert status == always, status  # every output pulled; DVC cannot see the registry


def test_promote_and_serve_the_champion_from_the_registry(stack):
    from test_tracking import _serve_and_classify

    from visionops.data import dataset
    from visionops.serving.pyfunc import encode_png

    services, projects = stack
    a = projects[0].path
    promoted = _run(services, a, "visionops", "promote", check=False)
    assert promoted.returncode in (0, 1), promoted.stderr  # 1: the challenger (if any) was rejected, clearly
    import mlflow

    champion = mlflow.MlflowClient(services.client_env()["MLFLOW_TRACKING_URI"]).get_model_version_by_alias(TEACHER, "champion")
    image = dataset.load(a / "data" / "dataset").splits["test"].images[0]
    prediction = _serve_and_classify(f"models:/{TEACHER}@champion", _env(services, a), a, encode_png(image))
    assert prediction, prediction
    assert champion.version in {"1", "2"}


def test_killing_the_mlflow_server_mid_run_leaves_the_store_consistent(stack):
    """The MLflow server dies while train is running and comes back at once: the stage fails and is retried
    (or the flow fails clearly); the registry holds no half-registered version, and aliases point at
    versions that are READY and whose runs finished."""
    import mlflow
    from prefect.deployments import run_deployment

    services, projects = stack
    b = projects[1]
    b.set_params(train={"epochs": FAST["train"]["epochs"] + 1})
    _commit(b, "longer")
    flow_run = run_deployment("training/nightly", parameters={"project_dir": str(b.path), "refresh_data": False}, timeout=0)
    deadline = time.monotonic() + 300
    client_uri = services.client_env()["MLFLOW_TRACKING_URI"]
    client = mlflow.MlflowClient(client_uri)
    exp = [e.experiment_id for e in client.search_experiments()]
    while not client.search_runs(exp, f"tags.`prefect.flow_run_id` = '{flow_run.id}' and tags.`visionops.stage` = 'train'"):
        assert time.monotonic() < deadline, "the train stage never started"
        time.sleep(1)
    assert services.stop_one("mlflow")
    services.start_mlflow()
    run = _wait_final([str(flow_run.id)])[0]
    assert run.state.is_final() and (run.state.is_completed() or run.state.message), run.state
    train_runs = client.search_runs(exp, f"tags.`prefect.flow_run_id` = '{flow_run.id}' and tags.`visionops.stage` = 'train'")
    print(f"flow run after the MLflow restart: {run.state.type.value} ({run.state.message}); "
          f"train stage runs: {[r.info.status for r in train_runs]}")
    client = mlflow.MlflowClient(client_uri)
    versions = client.search_model_versions(f"name = '{TEACHER}'")
    for v in versions:
        assert v.status == "READY", v
        assert client.get_run(v.run_id).info.status == "FINISHED" or not v.aliases, v
    champion = client.get_model_version_by_alias(TEACHER, "champion")
    assert champion.status == "READY"


def _table_rows(services: svc.Services, db: str) -> dict[str, str]:
    """Every row of every table of a service's database, as text: what the service keeps."""
    with services.pg_connect(db) as conn, conn.cursor() as cur:
        cur.execute("SELECT table_name FROM information_schema.tables WHERE table_schema = 'public'")
        tables = [t for (t,) in cur.fetchall()]
        out = {}
        for table in tables:
            cur.execute(f'SELECT t::text FROM "{table}" t')
            out[table] = "\n".join(row for (row,) in cur.fetchall())
    return out


def test_no_secret_in_process_lists_mlflow_records_prefect_logs_or_service_logs(stack):
    """The database password and the S3 keys (every credential; `.services/env` holds the S3 keys, the rest
    of it is addresses) appear in no command line `ps` showed while the flows ran or shows now, in no MLflow
    record (every row of its database: params, tags, model versions; every object in its artifact bucket),
    in no Prefect record (every row of its database: flow runs, their logs, events) and in no service's log."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    services, _ = stack
    creds = svc._read_env_file(services.dir / "credentials.env")
    secrets = {k: creds[k] for k in svc.CREDENTIAL_KEYS}
    env_file = svc._read_env_file(services.env_file)
    assert {k: env_file[k] for k in svc.S3_KEYS} == {k: secrets[k] for k in svc.S3_KEYS}
    assert all(len(v) >= 16 for v in secrets.values())

    places: dict[str, str] = {"ps now": "\n".join(_ps_args()), "ps while the flows ran": "\n".join(PS_LINES)}
    mlflow_rows, prefect_rows = _table_rows(services, "mlflow"), _table_rows(services, "prefect")
    places |= {f"mlflow table {t}": rows for t, rows in mlflow_rows.items()}
    places |= {f"prefect table {t}": rows for t, rows in prefect_rows.items()}
    ids = getattr(services, "flow_run_ids", [])
    with get_client(sync_client=True) as client:
        logs, offset = [], 0
        while batch := client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=ids)), offset=offset):
            logs += [log.message for log in batch]
            offset += len(batch)
    places["prefect flow-run logs"] = "\n".join(logs)
    s3 = services.s3_client()
    pages = s3.get_paginator("list_objects_v2").paginate(Bucket="mlflow")
    keys = [o["Key"] for page in pages for o in page.get("Contents", [])]
    places |= {f"s3://mlflow/{k}": s3.get_object(Bucket="mlflow", Key=k)["Body"].read().decode("latin-1") for k in keys}
    service_logs = [*services.logs.glob("*.log"), services.dir / "pg" / "postgres.log"]
    places |= {str(p): p.read_text(errors="replace") for p in service_logs}

    # what was scanned holds what it should: the runs' tags, the stages' logs, the models, the servers' output
    assert ids and all(i in mlflow_rows["tags"] for i in ids) and "train.epochs" in mlflow_rows["params"]
    assert "$ dvc repro" in places["prefect flow-run logs"] and "$ dvc repro" in "\n".join(prefect_rows.values())
    assert any(k.endswith("/MLmodel") for k in keys) and any("dvc repro" in line for line in PS_LINES)
    assert any("bin/mlflow server " in line and "s3://mlflow" in line for line in PS_LINES)  # whole command lines
    leaks = [(name, where) for where, text in places.items() for name, value in secrets.items() if value in text]
    assert not leaks, leaks


def test_schedules_stay_active_stop_leaves_no_process_and_data_survives_a_restart(stack):
    from prefect.client.orchestration import get_client

    services, _ = stack
    pids = {n: e["pid"] for n, e in services.pids().items()}
    assert {"postgres", "seaweedfs", "mlflow", "prefect", "worker-1", "worker-2"} <= set(pids)
    tree = {p.pid for n in pids if (proc := services.running(n)) for p in [proc, *proc.children(recursive=True)]}
    services.stop_one("worker-1")
    services.stop_one("worker-2")
    with get_client(sync_client=True) as client:
        nightly = client.read_deployment_by_name("training/nightly")
        assert not nightly.paused and all(s.active for s in nightly.schedules)
    services.stop()
    alive = [p for p in tree if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
    assert not alive, [psutil.Process(p).cmdline() for p in alive]
    assert services.pids() == {}
    stragglers = [p.info for p in psutil.process_iter(["pid", "cmdline"]) if str(services.dir) in " ".join(p.info["cmdline"] or [])]
    assert not stragglers, stragglers

    # a restart finds everything again: the same registry in PostgreSQL, the same objects in SeaweedFS
    import mlflow

    services.start(workers=0, deploy=False, dvc=False)
    try:
        client = mlflow.MlflowClient(services.client_env()["MLFLOW_TRACKING_URI"])
        assert len(client.search_model_versions(f"name = '{TEACHER}'")) >= 2
        assert client.get_model_version_by_alias(TEACHER, "champion").status == "READY"
        assert services.s3_client().list_objects_v2(Bucket="dvc").get("KeyCount", 0) > 0
    finally:
        assert set(services.stop()) == {"postgres", "seaweedfs", "mlflow", "prefect"}
