"""No library phones home. Run from the project root with a clean environment (no Makefile variables, no CI
markers, which MLflow and Prefect take for "off" by themselves), each library's own setting says so: the
project's files (.dvc/config, prefect.toml) alone for DVC and the Prefect server; after an entry point's
start-up (`visionops`, `python -m pipelines`) for everything, MLflow and Prefect's SDK events included."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Prints what each library decides. "files": the project's files only (MLflow is not imported there: with its
# telemetry on, `import mlflow` starts the client that sends it).
PROBE = """
import importlib.util, json, sys, tempfile
mode = sys.argv[1]
if mode == "visionops":
    from visionops.cli import main
    main(["check"])
elif mode == "pipelines":
    from pipelines.__main__ import main
    main(["stop", "--prefect-home", tempfile.mkdtemp()])
from dvc import analytics as dvc_analytics
from dvc.updater import Updater
from prefect._internal.analytics import is_telemetry_enabled
from prefect.settings import get_current_settings
out = {
    "dvc analytics": dvc_analytics.is_enabled(),
    "dvc update check": Updater(tempfile.mkdtemp()).is_enabled(),
    "prefect server analytics": get_current_settings().server.analytics_enabled,
}
if mode != "files":
    import mlflow.telemetry
    from mlflow.telemetry.utils import is_telemetry_disabled
    out["mlflow telemetry"] = not is_telemetry_disabled() or mlflow.telemetry.get_telemetry_client() is not None
    out["prefect sdk events"] = is_telemetry_enabled()
    if importlib.util.find_spec("great_expectations.analytics"):  # GX 1.24 sends nothing: the module is gone
        from great_expectations.analytics.config import ENV_CONFIG
        out["gx analytics"] = ENV_CONFIG.gx_analytics_enabled
print("PROBE " + json.dumps(out))
"""


def _probe(mode: str, home: Path) -> dict[str, bool]:
    env = {"PATH": os.pathsep.join([str(Path(sys.executable).parent), "/usr/bin", "/bin"]), "HOME": str(home),
           "PYTHONPATH": str(ROOT / "src"), "LANG": "C.UTF-8"}
    proc = subprocess.run([sys.executable, "-c", PROBE, mode], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(line for line in proc.stdout.splitlines() if line.startswith("PROBE "))
    return json.loads(line.removeprefix("PROBE "))


def test_the_project_files_turn_dvc_and_the_prefect_server_analytics_off(tmp_path):
    seen = _probe("files", tmp_path)
    assert seen == {"dvc analytics": False, "dvc update check": False, "prefect server analytics": False}


@pytest.mark.parametrize("entry_point", ["visionops", "pipelines"])
def test_after_an_entry_points_start_up_no_library_phones_home(entry_point, tmp_path):
    seen = _probe(entry_point, tmp_path)
    assert {"dvc analytics", "prefect server analytics", "mlflow telemetry", "prefect sdk events"} <= set(seen)
    assert not any(seen.values()), seen
