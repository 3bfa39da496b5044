"""A throwaway copy of the project (git + DVC) in which tests run the real `dvc repro`."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


class Project:
    def __init__(self, path: Path, params: Path = ROOT / "params.yaml"):
        """A copy of the project at `path`, with `params` (e.g. a preset) as its params.yaml."""
        self.path = path
        path.mkdir(parents=True)
        for name in ("dvc.yaml", ".gitignore", ".dvcignore", "data/imports.csv"):
            (path / name).parent.mkdir(exist_ok=True)
            shutil.copy(ROOT / name, path / name)
        shutil.copy(params, path / "params.yaml")
        shutil.copytree(ROOT / "src", path / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        (path / ".dvc").mkdir()
        shutil.copy(ROOT / ".dvc" / "config", path / ".dvc" / "config")
        self.run("git", "init", "-q")
        self.run("git", "add", "-A")
        self.run("git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "init")

    def env(self) -> dict[str, str]:
        """The test's environment, minus MLFLOW_TRACKING_URI: each project tracks into its own mlflow.db."""
        inherited = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
        return {
            **inherited,
            "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
            "DVC_NO_ANALYTICS": "1",
            "GX_ANALYTICS_ENABLED": "false",
            "PYTHONPATH": str(self.path / "src"),
        }

    def run(self, *cmd: str, check: bool = True) -> subprocess.CompletedProcess:
        proc = subprocess.run(cmd, cwd=self.path, env=self.env(), capture_output=True, text=True)
        if check and proc.returncode != 0:
            raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
        return proc

    def repro(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return self.run("dvc", "repro", *args, check=check)

    def set_params(self, **sections: dict) -> None:
        params = yaml.safe_load((self.path / "params.yaml").read_text())
        for section, values in sections.items():
            params.setdefault(section, {}).update(values)
        (self.path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
