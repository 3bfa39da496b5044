"""Prefect flows around the visionops DVC pipeline.

`training`   one Prefect task per DVC stage of dvc.yaml, in dependency order (each runs
             `dvc repro --single-item <stage>`, so the UI shows every stage with its logs, state, retries
             and duration while DVC alone decides what is up to date and writes dvc.lock); then the
             metric-gated promotion of teacher and student; then a markdown artifact (metrics, promotion
             decisions, MLflow run ids of the stages).
`promotion`  the metric-gated promotion alone (teacher and student), with a markdown artifact.
`monitoring` fetches the newest data with the download core into data/monitoring/ (never touching the
             training workspace data/dataset or the frozen data/holdout), validates it, and evaluates the
             registered champion on its holdout split (images no model trains on); fails, with the
             numbers, when the headline metric < monitor.min_score.
`drift`      (pipelines/drift.py) the newest window of the inference log against the champion's reference
             profile; persistent drift starts the training deployment with a `cause`.

Lineage: every stage subprocess gets VISIONOPS_PIPELINE_RUN_ID=prefect-<flow run id> and
VISIONOPS_PREFECT_FLOW_RUN_ID=<flow run id>, so all MLflow stage runs of one flow run hang under one
pipeline run and carry the tag `prefect.flow_run_id`; VISIONOPS_PIPELINE_NAME=<flow run name> <overrides>
names that pipeline run.

Logs: each stage's DVC output is one record of its task; the flow logs one line per stage with its
result, which is what DVC did: ran, restored from its run cache (new outputs, no command run) or up to
date. The task ends as `Completed("<result> in N s")` and the summary artifact says the same (and which
attempt it was, when a stage was retried). The flow never decides in DVC's place: every stage, up to date
or not, goes through `dvc repro --single-item`, since only DVC knows what a run-cache restore changed.

Parameter overrides (`overrides={"train.epochs": 5}`, `python -m pipelines training --set train.epochs=5`)
-----------------------------------------------------------------------------------------------------
They go through DVC, with the `dvc exp run -S` grammar, and the user's params.yaml is left byte for byte
as it was, as `dvc exp run -S --temp` leaves it:

1. `apply-overrides` applies them to a scratch copy of the params file(s) and validates the result with
   the visionops schema (a typo or a bad value fails the flow before anything changes), keeps the files'
   original bytes, then applies them to the project with DVC's own function
   (`dvc.utils.hydra.apply_overrides`, which `dvc exp run -S` calls; Hydra values: `5` is an int, `null`
   None, `[1,2]` a list, and an unknown key is an error rather than a silently added one).
2. Each stage task reproduces its stage; DVC records the parameters each stage ran with in dvc.lock.
3. `save-experiment` commits the result as a DVC experiment (`dvc exp save`, named `experiment_name` or
   else after the flow run): params, dvc.lock and metrics as they ran. `dvc exp show` lists it and
   `dvc exp apply <name>` brings its params back into the workspace.
4. The params file(s) get their original bytes back, also when the flow fails or is interrupted.

Why not `dvc exp run -S` itself: it reproduces the whole pipeline in one process, so the UI would show
one opaque step instead of a task per stage, and `--single-item` per task would record the run as one
experiment per stage. What the workspace holds afterwards is said plainly: the outputs and dvc.lock of
the experiment, and the user's params, so `dvc status` lists the stages whose params differ from the
ones they ran with, and the next `dvc repro` (or `make flow`) rebuilds them for params.yaml. `dvc exp
save`, like `dvc exp run`, resets the git index (staged changes become unstaged). A run without
overrides saves an experiment only when `experiment_name` is given.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import tempfile
import time
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run as current_flow_run
from prefect.runtime import task_run as current_task_run
from prefect.states import Completed
from prefect.tasks import exponential_backoff

from pipelines import dvc_stages

# Retry and timeout policy of the stage tasks. Module constants so tests (and operators) can adjust them.
DATA_STAGE = "download"  # the stage that fetches the data source (retried with backoff; forced on refresh)
DOWNLOAD_RETRIES = 3
DOWNLOAD_BACKOFF_S = 10.0  # exponential backoff: 10 s, 20 s, 40 s (+ jitter)
STAGE_RETRIES = 1  # every other stage
STAGE_RETRY_DELAY_S = 30.0
RETRY_JITTER_FACTOR = 0.2
LONG_STAGES = ("label_issues", "pretrain", "train", "evaluate", "baseline", "distill")
LONG_STAGE_TIMEOUT_S = 2 * 60 * 60  # a task timeout terminates the stage's dvc process group

PARAMS_FILE = "params.yaml"
HOLDOUT = Path("data") / "holdout"  # the frozen holdout promotion judges on (visionops.layout.HOLDOUT)
MONITORING = Path("data") / "monitoring"  # the monitoring flow's own copy of the newest data: dataset/, holdout/, validate/
REPORTS = Path("reports")

TRAINING_ARTIFACT, PROMOTION_ARTIFACT, MONITORING_ARTIFACT = "training-summary", "promotion-decisions", "monitoring-report"
CAUSE_TAG = "visionops.cause"  # on every version a training run's promotion judged: why that run started (its `cause`)

# (report, key, label) rows of the metrics table, taken from reports/<report>/{metrics,details,measured}.json
METRICS = (
    ("train", "epochs_run", "teacher epochs run"),
    ("train", "best_val_acc", "teacher best val accuracy"),
    ("evaluate", "accuracy", "teacher test accuracy"),
    ("evaluate", "balanced_accuracy", "teacher balanced accuracy"),
    ("evaluate", "macro_f1", "teacher macro F1"),
    ("evaluate", "top_k_accuracy", "teacher top-k accuracy"),
    ("evaluate", "ece", "teacher ECE"),
    ("evaluate", "ece_calibrated", "teacher ECE (temperature-scaled)"),
    ("evaluate", "latency_batch_ms", "teacher latency (ms / batch)"),
    ("distill", "student_acc", "student test accuracy"),
    ("distill", "baseline_acc", "student without distillation"),
    ("distill", "kd_gain", "distillation gain"),
    ("distill", "int8_acc", "student int8 accuracy"),
    ("distill", "cpu_speedup", "student CPU speed-up"),
)


class OverrideError(ValueError):
    """Overrides that DVC cannot apply or that make params.yaml invalid."""


class MonitoringAlert(RuntimeError):
    """The champion's headline metric on the newest data is below monitor.min_score."""


class NoChampionError(RuntimeError):
    """There is no registered champion to monitor."""


# ------------------------------------------------------------------------------------------
# stage tasks


@task(cache_policy=NO_CACHE, persist_result=False)
def dvc_stage(project_dir: str, stage: str, pipeline_run_id: str, flow_run_id: str, pipeline_name: str = "", force: bool = False):
    """Reproduce one DVC stage; its output goes to this task's log as one record.

    Ends as `Completed("<what DVC did> in N s")` (ran, restored from run cache, up to date): the state
    message the UI shows beside the task. The summary also holds which attempt this was (1 + retries)."""
    result = dvc_stages.run_stage(
        project_dir, stage, pipeline_run_id=pipeline_run_id, flow_run_id=flow_run_id, force=force,
        logger=get_run_logger(), pipeline_name=pipeline_name or None,
    )
    return Completed(message=f"{result.outcome} in {result.seconds:.1f} s", data={**result.summary(), "attempt": current_task_run.run_count})


def stage_policy(stage: str) -> dict:
    """Retries, retry delays and timeout of the task of `stage` (read when the flow runs)."""
    if stage == DATA_STAGE:
        policy = {"retries": DOWNLOAD_RETRIES, "retry_delay_seconds": exponential_backoff(DOWNLOAD_BACKOFF_S)}
    else:
        policy = {"retries": STAGE_RETRIES, "retry_delay_seconds": STAGE_RETRY_DELAY_S}
    policy["retry_jitter_factor"] = RETRY_JITTER_FACTOR
    policy["timeout_seconds"] = LONG_STAGE_TIMEOUT_S if stage in LONG_STAGES else None
    return policy


def stage_task(stage: str):
    """The Prefect task that reproduces `stage` (named after it in the UI)."""
    return dvc_stage.with_options(name=stage, task_run_name=stage, **stage_policy(stage))


def _ids() -> tuple[str, str]:
    flow_run_id = str(current_flow_run.id)
    return flow_run_id, f"prefect-{flow_run_id}"


def pipeline_name(flow_run_name: str, overrides: list[str]) -> str:
    """The name of one pipeline run: the flow run's name, then the overrides (`brave-fox train.epochs=2`)."""
    return " ".join([flow_run_name, *overrides])


def _run_stages(root: Path, stages: list[str], refresh_data: bool, record: list[dict], name: str) -> None:
    flow_run_id, pipeline_id = _ids()
    logger = get_run_logger()
    for stage in stages:  # DVC decides each one: a stage restored from the run cache changes what follows
        force = refresh_data and stage == DATA_STAGE
        record.append({"stage": stage, "state": "running"})
        state = stage_task(stage)(str(root), stage, pipeline_id, flow_run_id, name, force=force)
        summary = state.result()  # the task returned its Completed state (a failure raised)
        record[-1] = {**summary, "state": summary["outcome"]}
        retried = f", attempt {summary['attempt']}" if summary["attempt"] > 1 else ""
        logger.info("%-9s %s (%.1f s%s)", stage, record[-1]["state"], summary["seconds"], retried)


# ------------------------------------------------------------------------------------------
# overrides


def override_strings(overrides: dict[str, object] | None) -> list[str]:
    """`{"train.epochs": 5}` -> `["train.epochs=5"]` (the `dvc exp run -S` form).

    String values are passed through as Hydra override values, as on the `-S` command line (`"5"` is an
    int, `"null"` None, `"[1,2]"` a list); other values are written in that syntax."""

    def value(v, top: bool = True) -> str:
        if isinstance(v, str):
            return v if top else json.dumps(v)
        if v is None:
            return "null"
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, int | float):
            if isinstance(v, float) and not math.isfinite(v):
                raise OverrideError(f"override value {v!r} is not a finite number")
            return repr(v)
        if isinstance(v, list | tuple):
            return "[" + ",".join(value(x, False) for x in v) + "]"
        if isinstance(v, dict):
            return "{" + ",".join(f"{k}:{value(x, False)}" for k, x in v.items()) + "}"
        raise OverrideError(f"override value {v!r} has unsupported type {type(v).__name__}")

    out = []
    for key, v in (overrides or {}).items():
        if not key or "=" in key:
            raise OverrideError(f"bad override key {key!r}: use dotted keys like 'train.epochs'")
        out.append(f"{key}={value(v)}")
    return out


def _apply(path: Path, overrides: list[str]) -> None:
    from dvc.exceptions import InvalidArgumentError
    from dvc.utils.hydra import apply_overrides

    try:
        apply_overrides(path, overrides)
    except InvalidArgumentError as exc:
        cause = exc.__cause__ or exc
        raise OverrideError(f"cannot apply {overrides} to {path.name}: {cause}") from None


def override_files(project_dir: Path | str, overrides: dict[str, object] | list[str]) -> dict[Path, bytes]:
    """The bytes of every params file the overrides would change (to give back with `restore_files`)."""
    from dvc.utils.cli_parse import to_path_overrides

    root = Path(project_dir).resolve()
    strings = list(overrides) if isinstance(overrides, list) else override_strings(overrides)
    return {root / name: (root / name).read_bytes() for name in to_path_overrides(strings) if (root / name).is_file()}


def apply_param_overrides(project_dir: Path | str, overrides: dict[str, object] | list[str]) -> list[str]:
    """Apply `dvc exp run -S`-style overrides to the project's params file(s), validated first."""
    from dvc.utils.cli_parse import to_path_overrides

    from visionops.config import load_params

    root = Path(project_dir).resolve()
    strings = list(overrides) if isinstance(overrides, list) else override_strings(overrides)
    by_file = to_path_overrides(strings)
    for name in by_file:
        if not (root / name).is_file():
            raise OverrideError(f"{root / name}: no such params file for overrides {by_file[name]}")
    with tempfile.TemporaryDirectory(prefix="visionops-overrides-") as tmp:  # dry run on copies
        for name, items in by_file.items():
            scratch = Path(tmp) / Path(name).name
            shutil.copy(root / name, scratch)
            _apply(scratch, items)
            if Path(name).name == PARAMS_FILE:
                load_params(scratch)  # ParamsError names the key
    for name, items in by_file.items():
        _apply(root / name, items)
    return strings


def restore_files(originals: dict[Path, bytes]) -> None:
    """Give each file its original bytes back (atomically)."""
    from visionops.atomic import atomic_path

    for path, data in originals.items():
        if not path.is_file() or path.read_bytes() != data:
            with atomic_path(path) as tmp:
                tmp.write_bytes(data)


@task(name="apply-overrides", task_run_name="apply-overrides", cache_policy=NO_CACHE, persist_result=False)
def apply_overrides_task(project_dir: str, overrides: dict[str, object]) -> list[str]:
    """Apply the overrides through DVC (see the module docstring)."""
    applied = apply_param_overrides(project_dir, overrides)
    get_run_logger().info("applied through DVC's params overrides (as `dvc exp run -S`): %s", ", ".join(applied))
    return applied


@task(name="save-experiment", task_run_name="save-experiment", cache_policy=NO_CACHE, persist_result=False)
def save_experiment(project_dir: str, name: str, message: str) -> str:
    """`dvc exp save -n <name>`: the finished workspace as a named DVC experiment."""
    import subprocess

    env = dvc_stages.stage_env(project_dir)
    cmd = [*dvc_stages.dvc_command(env), "exp", "save", "--force", "-n", name, "-m", message]
    proc = subprocess.run(cmd, check=False, cwd=project_dir, env=env, capture_output=True, text=True)
    get_run_logger().info("$ %s\n%s", " ".join(cmd[-6:]), (proc.stdout + proc.stderr).strip())
    if proc.returncode != 0:
        raise RuntimeError(f"dvc exp save -n {name} failed ({proc.returncode}): {(proc.stderr or proc.stdout).strip()[-500:]}")
    return name


# ------------------------------------------------------------------------------------------
# promotion


def _params(root: Path):
    from visionops.config import load_params

    return load_params(root / PARAMS_FILE)


def _champion_version(client, name: str) -> str | None:
    from mlflow.exceptions import MlflowException

    try:
        return str(client.get_model_version_by_alias(name, "champion").version)
    except MlflowException:
        return None


def _quiet_mlflow_downloads() -> None:
    """No per-file progress bars in the flow's logs when models are downloaded for evaluation."""
    import os

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


def _earlier_decision(client, name: str, gates: dict) -> dict | None:
    """The challenger's recorded rejection when it was judged against the champion it faces now, under
    the same gates (params.yaml `promote`), else None."""
    from mlflow.exceptions import MlflowException

    try:
        challenger = client.get_model_version_by_alias(name, "challenger")
    except MlflowException:
        return None
    tags, champion = challenger.tags or {}, _champion_version(client, name)
    if tags.get("promotion.decision") != "rejected" or tags.get("promotion.previous_champion", "") != (champion or ""):
        return None
    try:
        if json.loads(tags.get("promotion.metrics", "{}")).get("gates") != gates:
            return None
    except (ValueError, AttributeError):
        return None
    try:
        reasons = [str(r) for r in json.loads(tags.get("promotion.reasons", "[]"))]
    except ValueError:
        reasons = [tags.get("promotion.reasons", "")]
    when = tags.get("promotion.timestamp", "earlier")
    return {
        "outcome": "rejected", "challenger_version": str(challenger.version), "champion_version": champion,
        "previous_champion": champion, "score": None,
        "reasons": [f"already judged at {when} against the same champion and gates; not judged again", *reasons],
    }


def promote_all(project_dir: Path | str, rejudge: bool = True, cause: str | None = None) -> list[dict]:
    """The metric-gated promotion of the teacher, then the student; one outcome dict per model.

    A rejected challenger is an outcome (`"rejected"`, with the failed gates), as is a model with no
    challenger to decide on (`"no challenger"`: e.g. the first version was decided when it was registered).
    rejudge=False (the training flow): a challenger already rejected against the current champion keeps
    that decision instead of being scored again (the promotion flow and `visionops promote` rejudge).
    cause: tagged (`visionops.cause`) on every version judged here (the training run's reason, e.g. `drift:<run>`).
    """
    import mlflow

    from visionops.serving.promotion import NoChallengerError, promote

    _quiet_mlflow_downloads()
    from visionops.tracking.store import configure

    root = Path(project_dir).resolve()
    params = _params(root)
    configure(params.mlflow, root)
    client = mlflow.MlflowClient()
    outcomes = []
    for role, name in (("teacher", params.mlflow.teacher_model_name), ("student", params.mlflow.student_model_name)):
        earlier = None if rejudge else _earlier_decision(client, name, json.loads(params.promote.model_dump_json()))
        if earlier is not None:
            outcomes.append({"role": role, "model": name, **earlier})
            continue
        try:
            d = promote(name, root / HOLDOUT, params.promote, params.evaluate, client=client)
        except NoChallengerError as exc:
            outcomes.append({
                "role": role, "model": name, "outcome": "no challenger", "challenger_version": None,
                "champion_version": _champion_version(client, name), "previous_champion": None,
                "score": None, "reasons": [str(exc)],
            })
            continue
        if cause:
            client.set_model_version_tag(name, d.challenger_version, CAUSE_TAG, cause)
        outcomes.append({
            "role": role, "model": name, "outcome": "promoted" if d.promoted else "rejected",
            "challenger_version": d.challenger_version,
            "champion_version": d.challenger_version if d.promoted else d.champion_version,
            "previous_champion": d.champion_version,
            "score": d.challenger_metrics.get(d.challenger_metrics.get("headline")),  # accuracy, mAP@.5 or mIoU
            "reasons": list(d.reasons),
        })
    return outcomes


@task(name="promote", task_run_name="promote", cache_policy=NO_CACHE, persist_result=False)
def promote_task(project_dir: str, rejudge: bool = True, cause: str | None = None) -> list[dict]:
    """Promote teacher and student challengers that pass the gates in params.yaml `promote`."""
    logger = get_run_logger()
    outcomes = promote_all(project_dir, rejudge, cause)
    for o in outcomes:
        text = f"{o['role']} {o['model']}: {o['outcome']}"
        if o["challenger_version"]:
            champion = f"v{o['champion_version']}" if o["champion_version"] else "none"
            text += f" (challenger v{o['challenger_version']}, champion now {champion})"
        (logger.warning if o["outcome"] == "rejected" else logger.info)(text + ": " + "; ".join(o["reasons"]))
    return outcomes


# ------------------------------------------------------------------------------------------
# report


def _cell(v) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.4f}"
    return str(v).replace("|", "\\|").replace("\n", " ")


def _seconds(v) -> str | None:
    return None if v is None else f"{v:.1f}"


def _table(headers: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def collect_metrics(project_dir: Path | str) -> list[tuple[str, str, object]]:
    """(label, source, value) of the headline metrics found in reports/<stage>/: the DVC metrics, their
    details, and what the stage measured about the machine (measured.json)."""
    root = Path(project_dir)
    rows = []
    for report, key, label in METRICS:
        value = None
        for name in ("metrics.json", "details.json", "measured.json"):
            try:
                value = json.loads((root / REPORTS / report / name).read_text()).get(key, value)
            except (OSError, ValueError):
                continue
        if isinstance(value, int | float) and not isinstance(value, bool):
            rows.append((label, f"{report}/{key}", value))
    shown = {source for _, source, _ in rows}
    for path in sorted((root / REPORTS).glob("*/metrics.json")):  # the other tasks' headline metrics
        try:
            headline = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        rows += [(f"{path.parent.name} {key}", f"{path.parent.name}/{key}", value) for key, value in headline.items()
                 if isinstance(value, int | float) and not isinstance(value, bool) and f"{path.parent.name}/{key}" not in shown]
    return rows


def mlflow_stage_runs(project_dir: Path | str, pipeline_id: str) -> list[dict]:
    """The MLflow runs (pipeline parent and stages) tagged with this pipeline run id."""
    import mlflow

    from visionops.tracking.stage_run import PIPELINE_TAG, ROLE_TAG
    from visionops.tracking.store import configure

    root = Path(project_dir).resolve()
    params = _params(root)
    if not params.mlflow.enabled:
        return []
    experiment_id = configure(params.mlflow, root)
    runs = mlflow.MlflowClient().search_runs(
        [experiment_id], f"tags.`{PIPELINE_TAG}` = '{pipeline_id}'", order_by=["attributes.start_time ASC"]
    )
    return [
        {
            "stage": r.data.tags.get("visionops.stage") or r.data.tags.get(ROLE_TAG, ""),
            "role": r.data.tags.get(ROLE_TAG, ""),
            "run_id": r.info.run_id,
            "status": r.info.status,
        }
        for r in runs
    ]


def _promotion_table(outcomes: list[dict]) -> str:
    rows = [
        [o["role"], o["model"], o["outcome"].upper(), o["challenger_version"], o["previous_champion"],
         o["champion_version"], o["score"], "; ".join(o["reasons"])]
        for o in outcomes
    ]
    return _table(["role", "model", "decision", "challenger", "champion before", "champion now", "holdout score", "reasons"], rows)


STAGE_RESULTS = {
    dvc_stages.UP_TO_DATE: "skipped: up to date (DVC)",
    dvc_stages.RESTORED: "restored from DVC's run cache (outputs changed, command not run)",
}


def _stage_result(stage: dict) -> str:
    text = STAGE_RESULTS.get(stage["state"], stage["state"])
    return text + (f" (attempt {stage['attempt']})" if stage.get("attempt", 1) > 1 else "")


def training_markdown(summary: dict) -> str:
    status = "FAILED" if summary.get("error") else "COMPLETED"
    runs_by_stage = {r["stage"]: r for r in summary.get("mlflow_runs", []) if r["role"] == "stage"}
    parent = next((r for r in summary.get("mlflow_runs", []) if r["role"] == "pipeline"), None)
    out = [
        f"# Training flow run {status}",
        "",
        f"- flow run: `{summary['flow_run_id']}`",
        f"- project: `{summary['project_dir']}`",
        f"- MLflow pipeline run id (tag `visionops.pipeline_run_id`): `{summary['pipeline_run_id']}`"
        + (f", parent run `{parent['run_id']}`" if parent else ""),
        "- overrides (applied through DVC; params.yaml restored afterwards): "
        + (", ".join(f"`{o}`" for o in summary["overrides"]) or "none"),
    ]
    if summary.get("cause"):
        out.append(f"- cause: `{summary['cause']}` (tagged `{CAUSE_TAG}` on the versions promotion judged)")
    if summary.get("pipeline_name"):
        out.append(f"- pipeline name (`{dvc_stages.PIPELINE_NAME_ENV}`): `{summary['pipeline_name']}`")
    if summary.get("experiment"):
        out.append(f"- saved as DVC experiment `{summary['experiment']}`")
    if summary.get("error"):
        out += ["", "## Error", "", "```", summary["error"][-3000:], "```"]
    rows = [
        [s["stage"], _stage_result(s), _seconds(s.get("seconds")), runs_by_stage.get(s["stage"], {}).get("run_id")]
        for s in summary["stages"]
    ]
    rows += [[name, "not run", None, None] for name in summary["stage_order"][len(summary["stages"]):]]
    out += ["", "## Stages", "", _table(["stage", "result", "seconds", "MLflow run id"], rows)]
    if summary.get("metrics"):
        out += ["", "## Metrics", "", _table(["metric", "source", "value"], [list(m) for m in summary["metrics"]])]
    out += ["", "## Promotion", ""]
    if summary.get("promotion") is None:
        out.append(summary.get("promotion_note") or "not run")
    else:
        out.append(_promotion_table(summary["promotion"]))
    if summary.get("mlflow_error"):
        out += ["", f"MLflow runs could not be listed: {summary['mlflow_error']}"]
    return "\n".join(out) + "\n"


# ------------------------------------------------------------------------------------------
# flows


@flow(name="training", description="The DVC pipeline, one task per stage, then metric-gated promotion.")
def training(
    project_dir: str = ".",
    overrides: dict[str, object] | None = None,
    promote: bool = True,
    refresh_data: bool = False,
    experiment_name: str | None = None,
    cause: str | None = None,
) -> dict:
    """Reproduce the DVC pipeline stage by stage, promote teacher and student, and report.

    overrides: params to run with, as `dvc exp run -S` sets them (`{"train.epochs": 5}`); the run is saved
        as a DVC experiment and params.yaml keeps its original bytes (see the module docstring).
    cause: why this run started (the drift flow passes `drift:<its MLflow run id>`): in the summary, and tagged
        `visionops.cause` on every model version the promotion judged.
    promote: run the metric-gated promotion of teacher and student afterwards.
    refresh_data: force the download stage to fetch the source again (a folder or URL source may have
        new data that DVC cannot see); downstream stages rerun only if the dataset changed.
    experiment_name: save the finished workspace as this named DVC experiment (`dvc exp save`); with
        overrides and no name, the experiment is named after the flow run.
    """
    logger = get_run_logger()
    root = Path(project_dir).resolve()
    flow_run_id, pipeline_id = _ids()
    run_name = str(current_flow_run.name or flow_run_id)
    summary: dict = {
        "flow_run_id": flow_run_id, "pipeline_run_id": pipeline_id, "project_dir": str(root),
        "overrides": [], "stage_order": [], "stages": [], "promotion": None, "experiment": None, "cause": cause,
    }
    originals: dict[Path, bytes] = {}
    try:
        summary["stage_order"] = dvc_stages.stage_order(root)
        if overrides:
            originals = override_files(root, overrides)
            summary["overrides"] = apply_overrides_task(str(root), overrides)
            experiment_name = experiment_name or re.sub(r"[^A-Za-z0-9_-]+", "-", run_name).strip("-")
        params = _params(root)  # validated before any stage runs
        summary["pipeline_name"] = pipeline_name(run_name, summary["overrides"])
        logger.info("stages in dependency order: %s", " -> ".join(summary["stage_order"]))
        _run_stages(root, summary["stage_order"], refresh_data, summary["stages"], summary["pipeline_name"])
        if experiment_name:
            message = f"Prefect flow run {run_name} ({flow_run_id})" + (f"; overrides {' '.join(summary['overrides'])}" if summary["overrides"] else "")
            summary["experiment"] = save_experiment(str(root), experiment_name, message)
        if not promote:
            summary["promotion_note"] = "skipped (promote=False)"
        elif not params.mlflow.enabled:
            summary["promotion_note"] = "skipped: mlflow.enabled is false, so nothing is registered"
        else:
            summary["promotion"] = promote_task(str(root), rejudge=False, cause=cause)
    except BaseException as exc:
        summary["error"] = f"{type(exc).__name__}: {exc}"
        if summary["stages"] and summary["stages"][-1]["state"] == "running":
            summary["stages"][-1]["state"] = "FAILED"
        raise
    finally:
        restore_files(originals)  # the user's params.yaml, byte for byte
        if originals:
            logger.info("params file(s) %s restored to their original bytes", ", ".join(p.name for p in originals))
        _report_training(root, summary)
    return summary


def _report_training(root: Path, summary: dict) -> None:
    summary["metrics"] = collect_metrics(root) if summary["stages"] else []
    try:
        summary["mlflow_runs"] = mlflow_stage_runs(root, summary["pipeline_run_id"])
    except Exception as exc:  # noqa: BLE001 - the report must not hide the flow's own outcome
        summary["mlflow_runs"], summary["mlflow_error"] = [], f"{type(exc).__name__}: {exc}"
    create_markdown_artifact(
        markdown=training_markdown(summary), key=TRAINING_ARTIFACT,
        description="DVC stages, metrics, promotion decisions and MLflow run ids of one training flow run",
    )


@flow(name="promotion", description="Metric-gated promotion of the teacher and student challengers.")
def promotion(project_dir: str = ".") -> list[dict]:
    """Promote each challenger that passes the gates in params.yaml `promote`; rejections are outcomes."""
    root = Path(project_dir).resolve()
    if not _params(root).mlflow.enabled:
        raise RuntimeError("mlflow.enabled is false in params.yaml: there is no registry to promote in")
    outcomes = promote_task(str(root))
    create_markdown_artifact(
        markdown=f"# Promotion decisions\n\nflow run `{current_flow_run.id}`, project `{root}`\n\n{_promotion_table(outcomes)}\n",
        key=PROMOTION_ARTIFACT, description="Champion/challenger decisions",
    )
    return outcomes


def _project_paths(cfg, root: Path):
    """`cfg` (a DataConfig) with its project-relative paths made absolute, for use outside the project dir."""
    update = {"cache_dir": str(root / cfg.cache_dir)}
    if cfg.root:
        update["root"] = str(root / cfg.root)
    return cfg.model_copy(update=update)


@task(name="fetch-newest-data", task_run_name="fetch-newest-data", cache_policy=NO_CACHE, persist_result=False)
def fetch_newest_data(project_dir: str) -> dict:
    """The task's download core on the configured source, written to data/monitoring/{dataset,holdout}."""
    from visionops.tasks import get_task

    root = Path(project_dir).resolve()
    params = _params(root)
    params = params.model_copy(update={"data": _project_paths(params.data, root)})
    out = root / MONITORING
    result = get_task(params.task).download(params, out / "dataset", out / "holdout")
    get_run_logger().info("newest data in %s: %s", out, json.dumps(result))
    return result


@task(name="validate-newest-data", task_run_name="validate-newest-data", cache_policy=NO_CACHE, persist_result=False)
def validate_newest_data(project_dir: str) -> dict:
    """The data checks of the validate stage on the newest data (reports in data/monitoring/validate)."""
    from visionops.tasks import get_task

    root = Path(project_dir).resolve()
    out = root / MONITORING
    params = _params(root)
    return get_task(params.task).validate(params, out / "dataset", out / "validate")


@task(name="evaluate-champion", task_run_name="evaluate-champion", cache_policy=NO_CACHE, persist_result=False)
def evaluate_champion(project_dir: str, holdout_dir: str) -> dict:
    """The task's scores (accuracy, mAP@.5 or mIoU, and more) of models:/<teacher_model_name>@champion on the
    holdout dataset in `holdout_dir`."""
    import mlflow

    from visionops.serving.promotion import evaluate_version
    from visionops.tracking.store import configure

    _quiet_mlflow_downloads()
    root = Path(project_dir).resolve()
    params = _params(root)
    configure(params.mlflow, root)
    name = params.mlflow.teacher_model_name
    version = _champion_version(mlflow.MlflowClient(), name)
    if version is None:
        raise NoChampionError(f"model {name!r} has no version with the alias 'champion': train and promote one first")
    start = time.monotonic()
    metrics = evaluate_version(f"models:/{name}/{version}", holdout_dir, params.evaluate)
    get_run_logger().info(
        "champion %s v%s: %s %.4f on %d holdout images (%.1f s)", name, version, metrics["headline"],
        metrics[metrics["headline"]], metrics["n"],
        time.monotonic() - start,
    )
    return {**metrics, "model": name, "version": version}


@flow(name="monitoring", description="Evaluate the champion on the newest data's holdout; fail below monitor.min_score.")
def monitoring(project_dir: str = ".", refresh_data: bool = True) -> dict:
    """Fetch the newest data into data/monitoring/, validate it, evaluate the champion on its holdout split
    and fail (raise MonitoringAlert, with the numbers) when its headline metric (accuracy, mAP@.5, mIoU) is
    below params.yaml monitor.min_score.

    The training workspace (data/dataset) and the frozen holdout (data/holdout) are never touched, and no
    DVC stage runs: the newest data is the download core's output in a directory of its own.
    refresh_data: fetch the source again (False reuses data/monitoring/ from the last run, if there is one).
    """
    root = Path(project_dir).resolve()
    params = _params(root)
    holdout = root / MONITORING / "holdout"
    stages: list[dict] = []
    if refresh_data or not (holdout / "meta.json").exists():
        # retried with backoff like the download stage
        for name, step in (("fetch-newest-data", fetch_newest_data.with_options(**stage_policy(DATA_STAGE))),
                           ("validate-newest-data", validate_newest_data)):
            start = time.monotonic()
            stages.append({"stage": name, "state": "running"})
            step(str(root))
            stages[-1] = {"stage": name, "state": "ran", "seconds": time.monotonic() - start}
    else:
        stages.append({"stage": "fetch-newest-data", "state": "skipped (refresh_data=False): the last fetch is reused"})
    result = evaluate_champion(str(root), str(holdout))
    floor = params.monitor.min_score
    key, per_class = result["headline"], result["per_class_metric"]
    ok = result[key] >= floor
    verdict = "OK" if ok else "ALERT"
    lowest = sorted(result[per_class].items(), key=lambda kv: kv[1])[:5]
    others = [k for k, v in result.items() if isinstance(v, float) and k not in (key, "latency_ms")]
    markdown = "\n".join([
        f"# Monitoring: {verdict}",
        "",
        (
            f"Champion `{result['model']}` v{result['version']} on the holdout split of the newest data "
            f"(`{MONITORING / 'holdout'}`, {result['n']} images), project `{root}`, flow run `{current_flow_run.id}`."
        ),
        "",
        _table(["metric", "value", "threshold"], [
            [key, result[key], f">= {floor:.4f} (monitor.min_score)"],
            *([k, result[k], None] for k in others),
            ["latency (ms / batch)", result["latency_ms"], None],
        ]),
        "",
        f"Lowest {per_class}: " + ", ".join(f"{c} {r:.3f}" for c, r in lowest),
        "",
        _table(["stage", "result", "seconds"], [[s["stage"], s["state"], _seconds(s.get("seconds"))] for s in stages]),
    ]) + "\n"
    create_markdown_artifact(markdown=markdown, key=MONITORING_ARTIFACT, description=f"Champion {key} on the newest data: {verdict}")
    summary = {**result, "min_score": floor, "ok": ok, "stages": stages}
    if not ok:
        more = ", ".join(f"{k} {result[k]:.4f}" for k in others)
        raise MonitoringAlert(
            f"champion {result['model']} v{result['version']} {key} {result[key]:.4f} on the newest data "
            f"({result['n']} holdout images) is below monitor.min_score {floor:.4f} ({more})"
        )
    return summary
