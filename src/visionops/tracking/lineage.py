"""Where a run came from: git commit, DVC dependency hashes, and the pipeline run it belongs to."""

from __future__ import annotations

import hashlib
import os
import subprocess
import uuid
from pathlib import Path

PIPELINE_RUN_ENV = "VISIONOPS_PIPELINE_RUN_ID"
PREFECT_FLOW_RUN_ENV = "VISIONOPS_PREFECT_FLOW_RUN_ID"


def git_info(root: Path) -> dict[str, str]:
    def git(*args: str) -> str:
        out = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True)
        return out.stdout.strip() if out.returncode == 0 else ""

    commit = git("rev-parse", "HEAD")
    return {"commit": commit or "unknown", "dirty": str(bool(git("status", "--porcelain", "--untracked-files=no"))).lower()}


def dvc_dep_hashes(root: Path, stage: str) -> dict[str, str]:
    """The current hashes of `stage`'s file deps as DVC computes them (its state cache makes this cheap)."""
    from dvc.repo import Repo

    with Repo(str(root)) as repo:
        (dvc_stage,) = repo.stage.collect(stage)
        return {
            dep.def_path: dep.get_hash().value
            for dep in dvc_stage.deps
            if type(dep).__name__ != "ParamsDependency"
        }


def data_version(hashes: dict[str, str]) -> str:
    """One digest of all dependency hashes: equal iff DVC would see the same inputs."""
    text = "\n".join(f"{path}:{md5}" for path, md5 in sorted(hashes.items()))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def pipeline_run_id() -> str:
    """Shared by every stage of one pipeline run.

    Set explicitly through VISIONOPS_PIPELINE_RUN_ID (the Prefect flow does), else derived from the
    `dvc repro` / `dvc exp run` process that launched this stage, else unique to this stage.
    """
    explicit = os.environ.get(PIPELINE_RUN_ENV)
    if explicit:
        return explicit
    import psutil

    proc = psutil.Process().parent()
    while proc is not None:
        try:
            cmd = proc.cmdline()
            if any(Path(c).name == "dvc" for c in cmd[:2]) and {"repro", "exp"} & set(cmd):
                return f"dvc-{proc.pid}-{int(proc.create_time())}"
            proc = proc.parent()
        except psutil.Error:
            break
    return f"single-{uuid.uuid4().hex[:12]}"
