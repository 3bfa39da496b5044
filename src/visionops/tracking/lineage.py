"""Where a run came from: git commit, DVC dependency hashes, and the pipeline run it belongs to."""

from __future__ import annotations

import hashlib
import logging
import os
import subprocess
import uuid
from pathlib import Path

from visionops.tracking.faults import process_start

PIPELINE_RUN_ENV = "VISIONOPS_PIPELINE_RUN_ID"
PREFECT_FLOW_RUN_ENV = "VISIONOPS_PREFECT_FLOW_RUN_ID"
PIPELINE_NAME_ENV = "VISIONOPS_PIPELINE_NAME"  # the parent run's name, set by whoever runs the pipeline (the flow)
DVC_EXP_NAME_ENV = "DVC_EXP_NAME"  # set by `dvc exp run` for every stage command (dvc/repo/experiments/queue/base.py)
# What git.dirty looks at: the code and the pipeline's definition. params.yaml is not in it: a run logs its
# params, and `dvc exp run -S` edits params.yaml on purpose. DVC's outputs (reports, models, dvc.lock) never are.
SINGLE_PREFIX = "single-"  # pipeline run id of a stage run on its own
SOURCE_PATHS = ("src", "pipelines", "dvc.yaml", "pyproject.toml", "requirements.lock")
LABEL_CHARS = 200  # an experiment's label in run names (`experiment_label`)


def git_info(root: Path) -> dict[str, str]:
    def git(*args: str) -> str:
        out = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True)
        return out.stdout.strip() if out.returncode == 0 else ""

    commit = git("rev-parse", "HEAD")
    dirty = bool(git("status", "--porcelain", "--", *SOURCE_PATHS))  # untracked sources count: a stage may import them
    return {"commit": commit or "unknown", "dirty": str(dirty).lower()}


def experiment_name() -> str | None:
    """The DVC experiment this stage runs in (`dvc exp run`), or None (`dvc repro`, the flow, by hand)."""
    return os.environ.get(DVC_EXP_NAME_ENV) or None


def param_overrides(root: Path | None = None) -> list[str]:
    """`key=value` for each value of root/params.yaml (default: the working directory's) that differs from
    the committed one: what `dvc exp run -S` set, in its syntax (`train.epochs=2`)."""
    import json

    import yaml

    root = root or Path.cwd()
    head = subprocess.run(["git", "show", "HEAD:./params.yaml"], cwd=root, capture_output=True, text=True)
    if head.returncode != 0 or not (root / "params.yaml").exists():
        return []
    before, now = _leaves(yaml.safe_load(head.stdout)), _leaves(yaml.safe_load((root / "params.yaml").read_text()))
    changed = {k: v for k, v in now.items() if k not in before or before[k] != v}
    return [f"{k}={v if isinstance(v, str) else json.dumps(v, separators=(',', ':'))}" for k, v in changed.items()]


def _leaves(tree: object, prefix: str = "") -> dict[str, object]:
    """A params tree's values by dotted key (`train.epochs`)."""
    if not isinstance(tree, dict) or not tree:
        return {prefix: tree}
    out: dict[str, object] = {}
    for key, sub in tree.items():
        out.update(_leaves(sub, f"{prefix}.{key}" if prefix else str(key)))
    return out


def experiment_label(root: Path | None = None) -> str | None:
    """The DVC experiment's name and the params it overrides (`hempy-mate train.epochs=2`), or None.

    Cut to LABEL_CHARS: a run name (the stage's name, then this) fits MLflow's 250-character column."""
    exp = experiment_name()
    if not exp:
        return None
    label = " ".join([exp, *param_overrides(root)])
    return label if len(label) <= LABEL_CHARS else label[: LABEL_CHARS - 1] + "…"


def pipeline_name(commit: str, dirty: str, pipeline_id: str, stage: str) -> str:
    """A readable name for a new pipeline run: VISIONOPS_PIPELINE_NAME (the flow sets it), else the DVC
    experiment's `experiment_label`, else `dvc repro <commit> <UTC time>` (`visionops <stage> ...` for a
    stage run by hand; the commit is marked + when its sources are edited)."""
    explicit = os.environ.get(PIPELINE_NAME_ENV)
    if explicit:
        return explicit
    label = experiment_label()
    if label:
        return f"dvc exp {label}"
    from datetime import UTC, datetime

    mark = "+" if dirty == "true" else ""
    how = f"visionops {stage}" if pipeline_id.startswith(SINGLE_PREFIX) else "dvc repro"
    return f"{how} {commit[:7]}{mark} {datetime.now(UTC):%Y-%m-%d %H:%M}"


def dvc_dep_hashes(root: Path, stage: str) -> dict[str, str]:
    """The current hashes of `stage`'s file deps as DVC computes them (its state cache makes this cheap),
    without DVC's "Collecting files and computing hashes" bar for each of them in the stage's output."""
    from dvc.repo import Repo

    logging.getLogger("dvc.progress").setLevel(logging.CRITICAL)  # DVC's bars show up to its ERROR level
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
                return f"dvc-{proc.pid}-{process_start(proc.pid)}"
            proc = proc.parent()
        except psutil.Error:
            break
    return f"{SINGLE_PREFIX}{uuid.uuid4().hex[:12]}"
