"""The DVC pipeline seen from Prefect: stage order from dvc.yaml, and running one stage.

`stage_order` reads dvc.yaml and sorts its stages topologically: stage A comes before stage B when one
of B's deps is (or is inside, or contains) one of A's outs/metrics/plots; among stages that are ready
at the same time, the one written first in dvc.yaml goes first, so the order is stable.

`run_stage` runs `dvc repro --single-item <stage>` in the project directory as a subprocess — DVC
decides whether the stage is up to date, runs it or restores it from its run cache, and writes dvc.lock;
the result says which, from DVC's own log line (`StageResult.outcome`) — with the lineage
environment (`VISIONOPS_PIPELINE_RUN_ID`, `VISIONOPS_PREFECT_FLOW_RUN_ID`, and `VISIONOPS_PIPELINE_NAME`:
the flow run's name and its overrides, which names the MLflow parent run) that makes every MLflow stage
run of one flow run share one pipeline id and carry the Prefect flow-run id. The output is collected and
logged as ONE record when the stage ends (not one record per line; the flow logs one line per stage);
a non-zero exit raises `StageFailed`, naming the stage, its exit code and the tail of its log.
"""

from __future__ import annotations

import heapq
import json
import logging
import os
import posixpath
import queue
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from visionops.errors import InvalidInputError, MissingInputError
from visionops.tracking.lineage import PIPELINE_RUN_ENV, PREFECT_FLOW_RUN_ENV

DVC_FILE = "dvc.yaml"
OUT_KEYS = ("outs", "metrics", "plots")
TAIL_LINES = 40  # lines of the stage's log quoted in StageFailed
KEEP_LINES = 20_000  # lines of log kept per stage run (the whole log of any normal stage)
KILL_GRACE_S = 10.0  # SIGTERM first, SIGKILL after this long
PIPELINE_NAME_ENV = "VISIONOPS_PIPELINE_NAME"  # a human name for the pipeline run (MLflow's parent run name)
COMMAND_EXIT = re.compile(r"failed to run: .*, exited with (-?\d+)")  # DVC's report of the stage command's exit
RAN, RESTORED, UP_TO_DATE = "ran", "restored from run cache", "up to date"
# What DVC did with a stage, by the line `dvc repro` logs for it (dvc/stage/run.py, cache.py, __init__.py). A stage
# restored from the run cache has new outputs just like one that ran: only UP_TO_DATE leaves its outputs alone.
OUTCOME_LINES = (
    (RAN, "Running stage '{stage}'"),
    (RESTORED, "Stage '{stage}' is cached - skipping run, checking out outputs"),
    (UP_TO_DATE, "Stage '{stage}' didn't change, skipping"),
)
UNSAID = "finished (DVC's log names no outcome)"


class StageFailed(RuntimeError):
    """`dvc repro` of one stage exited non-zero.

    `returncode` is the stage command's exit code when DVC reports it ("... exited with N"), else dvc's."""

    def __init__(self, stage: str, dvc_returncode: int, log: list[str], tail_lines: int = TAIL_LINES):
        found = [m.group(1) for line in log if (m := COMMAND_EXIT.search(line))]
        self.stage, self.dvc_returncode = stage, dvc_returncode
        self.returncode = int(found[-1]) if found else dvc_returncode
        tail = "\n".join(log[-tail_lines:]) if log else "(no output)"
        via = f" (dvc repro exited {dvc_returncode})" if self.returncode != dvc_returncode else ""
        super().__init__(
            f"DVC stage '{stage}' failed with exit code {self.returncode}{via}; last lines of its log:\n{tail}"
        )
        self.log_tail = log[-tail_lines:]

    def __reduce__(self):  # picklable (Prefect may serialise a task's exception)
        return type(self), (self.stage, self.dvc_returncode, self.log_tail, len(self.log_tail))


def outcome(stage: str, log: list[str]) -> str:
    """What `dvc repro` did with `stage` (RAN, RESTORED or UP_TO_DATE), read from its log."""
    text = "\n".join(log)
    return next((o for o, line in OUTCOME_LINES if line.format(stage=stage) in text), UNSAID)


@dataclass
class StageResult:
    stage: str
    returncode: int
    outcome: str  # RAN, RESTORED or UP_TO_DATE: what DVC did
    seconds: float
    log: list[str] = field(default_factory=list, repr=False)

    def summary(self) -> dict:
        return {"stage": self.stage, "returncode": self.returncode, "outcome": self.outcome, "seconds": round(self.seconds, 2)}


# ------------------------------------------------------------------------------------------
# stage order


def load_stages(project_dir: Path | str = ".") -> dict[str, dict]:
    """The `stages` mapping of the project's dvc.yaml, in file order."""
    path = Path(project_dir) / DVC_FILE
    try:
        doc = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise MissingInputError(f"{path}: no such file (project_dir must be a DVC project)") from None
    stages = doc.get("stages") or {}
    if not isinstance(stages, dict):
        raise InvalidInputError(f"{path}: 'stages' must be a mapping of stage names")
    for name, stage in stages.items():
        if not isinstance(stage, dict):
            raise InvalidInputError(f"{path}: stage '{name}' must be a mapping")
        if "foreach" in stage or "matrix" in stage:
            raise InvalidInputError(f"{path}: stage '{name}' is templated (foreach/matrix), which stage_order does not expand")
    return stages


def _paths(entries, wdir: str) -> list[str]:
    """Normalised, project-relative paths of a deps/outs list (entries are strings or {path: options})."""
    out = []
    for entry in entries or []:
        for p in [entry] if isinstance(entry, str) else list(entry):
            out.append(posixpath.normpath(posixpath.join(wdir, str(p))))
    return out


def _overlaps(a: str, b: str) -> bool:
    return a == b or a.startswith(b + "/") or b.startswith(a + "/") or "." in (a, b)


def stage_order(project_dir: Path | str = ".") -> list[str]:
    """Stage names of dvc.yaml in dependency order (topological by deps/outs, stable by file order)."""
    stages = load_stages(project_dir)
    names = list(stages)
    deps = {n: _paths(s.get("deps"), s.get("wdir", ".")) for n, s in stages.items()}
    outs = {n: [p for k in OUT_KEYS for p in _paths(s.get(k), s.get("wdir", "."))] for n, s in stages.items()}
    after: dict[str, set[str]] = {n: set() for n in names}  # stage -> stages that must run before it
    for b in names:
        for a in names:
            if a != b and any(_overlaps(d, o) for d in deps[b] for o in outs[a]):
                after[b].add(a)
    index = {n: i for i, n in enumerate(names)}
    waiting = {n: set(before) for n, before in after.items()}
    ready = [index[n] for n in names if not waiting[n]]
    heapq.heapify(ready)
    order: list[str] = []
    while ready:
        name = names[heapq.heappop(ready)]
        order.append(name)
        for other in names:
            if name in waiting[other]:
                waiting[other].discard(name)
                if not waiting[other]:
                    heapq.heappush(ready, index[other])
    if len(order) != len(names):
        stuck = [n for n in names if n not in order]
        raise InvalidInputError(f"{Path(project_dir) / DVC_FILE}: dependency cycle between stages {stuck}")
    return order


# ------------------------------------------------------------------------------------------
# running a stage


def stage_env(
    project_dir: Path | str,
    pipeline_run_id: str | None = None,
    flow_run_id: str | None = None,
    base: dict[str, str] | None = None,
    pipeline_name: str | None = None,
) -> dict[str, str]:
    """The environment of a stage subprocess: this interpreter's bin first on PATH (dvc, visionops),
    the project's src/ first on PYTHONPATH (the code DVC tracks as deps), analytics off, lineage ids
    and the pipeline run's name."""
    env = dict(os.environ if base is None else base)
    bin_dir = str(Path(sys.executable).parent)
    env["PATH"] = os.pathsep.join([bin_dir, *[p for p in env.get("PATH", "").split(os.pathsep) if p and p != bin_dir]])
    src = Path(project_dir).resolve() / "src"
    if src.is_dir():
        env["PYTHONPATH"] = os.pathsep.join([str(src), *[p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]])
    env.setdefault("DVC_NO_ANALYTICS", "1")
    env.setdefault("GX_ANALYTICS_ENABLED", "false")
    env.setdefault("PYTHONUNBUFFERED", "1")
    if pipeline_run_id:
        env[PIPELINE_RUN_ENV] = pipeline_run_id
    if flow_run_id:
        env[PREFECT_FLOW_RUN_ENV] = flow_run_id
    if pipeline_name:
        env[PIPELINE_NAME_ENV] = pipeline_name
    return env


def dvc_command(env: dict[str, str]) -> list[str]:
    exe = shutil.which("dvc", path=env.get("PATH"))
    return [exe] if exe else [sys.executable, "-m", "dvc"]


def stage_status(project_dir: Path | str, env: dict[str, str] | None = None) -> dict[str, list] | None:
    """`dvc status --json` as stage -> what changed (None when it cannot tell), for `nothing_to_do`: the flow
    itself asks `dvc repro` of every stage, since a stage restored from the run cache changes what follows it."""
    env = env if env is not None else stage_env(project_dir)
    proc = subprocess.run([*dvc_command(env), "status", "--json"], cwd=project_dir, env=env, capture_output=True,
                          text=True, check=False, stdin=subprocess.DEVNULL)
    try:
        status = json.loads(proc.stdout) if proc.returncode == 0 else None
    except ValueError:
        return None
    return {name.rsplit(":", 1)[-1]: entries for name, entries in status.items()} if isinstance(status, dict) else None


def _default_logger():
    try:
        from prefect import get_run_logger

        return get_run_logger()
    except Exception:  # noqa: BLE001 - outside a flow/task run (MissingContextError): plain logging
        return logging.getLogger(__name__)


def _pump(stream, lines: queue.Queue) -> None:
    """Read the child's output; a progress bar's carriage-return updates collapse to their last state."""
    try:
        for raw in iter(stream.readline, b""):
            text = raw.decode("utf-8", errors="replace").rstrip("\r\n")
            lines.put(text.rsplit("\r", 1)[-1].rstrip())
    finally:
        lines.put(None)


def _terminate(proc: subprocess.Popen) -> None:
    """Stop dvc and the stage command it started (their own process group)."""
    if proc.poll() is not None:
        return
    for sig, wait in ((signal.SIGTERM, KILL_GRACE_S), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def run_stage(
    project_dir: Path | str,
    stage: str,
    *,
    pipeline_run_id: str | None = None,
    flow_run_id: str | None = None,
    force: bool = False,
    logger=None,
    env: dict[str, str] | None = None,
    pipeline_name: str | None = None,
) -> StageResult:
    """`dvc repro --single-item [--force] <stage>` in `project_dir`; its output is logged to `logger` as
    one record when it ends.

    Raises StageFailed on a non-zero exit. If this call is interrupted (a Prefect task timeout, Ctrl-C),
    the dvc process group is terminated before the exception propagates.
    """
    project_dir = Path(project_dir).resolve()
    logger = logger or _default_logger()
    env = env if env is not None else stage_env(project_dir, pipeline_run_id, flow_run_id, pipeline_name=pipeline_name)
    args = ["repro", "--single-item", *(["--force"] if force else []), stage]
    cmd = [*dvc_command(env), *args]
    log: deque[str] = deque(maxlen=KEEP_LINES)
    start = time.monotonic()
    proc = subprocess.Popen(
        cmd, cwd=project_dir, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    lines: queue.Queue = queue.Queue()
    reader = threading.Thread(target=_pump, args=(proc.stdout, lines), daemon=True, name=f"dvc-{stage}-output")
    reader.start()
    try:
        while True:
            try:  # short waits keep this thread running Python code, so a task timeout can interrupt it
                line = lines.get(timeout=0.5)
            except queue.Empty:
                continue
            if line is None:
                break
            if line:
                log.append(line)
        returncode = proc.wait()
    finally:
        _terminate(proc)
        reader.join(timeout=5)
        if proc.stdout is not None:
            proc.stdout.close()
    result = StageResult(stage, returncode, outcome(stage, list(log)), time.monotonic() - start, list(log))
    logger.info("$ dvc %s  (in %s)\n%s", " ".join(args), project_dir, "\n".join(log) or "(no output)")
    if returncode != 0:
        raise StageFailed(stage, returncode, result.log)
    return result
