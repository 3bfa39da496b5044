"""Wall time of the whole pipeline on the embedded digits data, once the environment is set up.

Runs `dvc repro` from scratch in a throwaway copy of the project (no DVC run cache, fresh MLflow
store), then once more to time the no-op rerun.

    python bench/bench_make_run.py [--no-tracking]

--no-tracking sets mlflow.enabled: false in the copy, to separate the pipeline's own compute from
MLflow's per-stage cost (import, store, logging, registration and the first promotion).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def copy_project(dest: Path) -> None:
    for name in ("dvc.yaml", "params.yaml", ".gitignore", ".dvcignore"):
        shutil.copy(ROOT / name, dest / name)
    shutil.copytree(ROOT / "src", dest / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    (dest / ".dvc").mkdir()
    shutil.copy(ROOT / ".dvc" / "config", dest / ".dvc" / "config")
    for cmd in (["git", "init", "-q"], ["git", "add", "-A"], ["git", "-c", "user.name=b", "-c", "user.email=b@b", "commit", "-qm", "bench"]):
        subprocess.run(cmd, cwd=dest, check=True)


def timed(cmd: list[str], cwd: Path, env: dict) -> float:
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--no-tracking", action="store_true", help="run with mlflow.enabled: false")
    args = parser.parse_args()
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "DVC_NO_ANALYTICS": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    with tempfile.TemporaryDirectory() as tmp:
        project = Path(tmp) / "proj"
        project.mkdir()
        copy_project(project)
        if args.no_tracking:
            import yaml

            params = yaml.safe_load((project / "params.yaml").read_text())
            params["mlflow"]["enabled"] = False
            (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        env["PYTHONPATH"] = str(project / "src")
        first = timed(["dvc", "repro"], project, env)
        second = timed(["dvc", "repro"], project, env)
        metrics = {
            stage: json.loads((project / "reports" / stage / "metrics.json").read_text())
            for stage in ("evaluate", "distill")
        }
    print(json.dumps({
        "mlflow_tracking": not args.no_tracking,
        "dvc_repro_seconds": round(first, 1),
        "noop_rerun_seconds": round(second, 2),
        "teacher_test_accuracy": round(metrics["evaluate"]["accuracy"], 4),
        "student_test_accuracy": round(metrics["distill"]["student_acc"], 4),
        "cpus": os.cpu_count(),
    }, indent=2))


if __name__ == "__main__":
    main()
