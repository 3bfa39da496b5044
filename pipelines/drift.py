"""The `drift` flow: the newest window of the inference log against the served version's reference profile.

One run judges at most one window: the champion's (`alias`) version is found in the registry, the log rows of
that version (by its weights' SHA-256) newer than the previous window's end are read (up to 2 ×
`monitor.flush_seconds` ago: rows answered since may still be on their way to the log, and a row older than a
window's end is never read again), and the newest `monitor.window_rows` of them are judged (`visionops.monitoring.drift.judge_window`); fewer than
`monitor.min_window_rows` new rows: no window, and the run ends Completed saying so.

Each window is recorded in MLflow, in the experiment `visionops-drift`, in one run per model version (found
by its tags `visionops.drift.model` and `visionops.drift.version`): its numbers as metrics at step = the
window's index (so the drift history is a chart in the UI), its HTML report as `windows/<end>.html`, the
history chart as `drift_history.png`, and the last window's end as a tag (where the next run starts). The
flow run gets a markdown artifact with the verdict and where the report is.

Trigger: when the last `monitor.windows_to_trigger` windows of the version all drifted and no training run
this version's drift started is still in progress, the `training/nightly` deployment is run (newest data,
promotion on) with `cause="drift:<MLflow run id>"`; the training flow tags every version its promotion judged
with it (`visionops.cause`), and the drift run holds the training flow run's id
(`visionops.drift.triggered_flow_run`): report → flow run → model version, both ways.
"""

from __future__ import annotations

import os
import tempfile
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pandas as pd
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run as current_flow_run

from pipelines.flows import NoChampionError, _params, _quiet_mlflow_downloads, _table

EXPERIMENT = "visionops-drift"
DRIFT_ARTIFACT = "drift-window"
TRAINING_DEPLOYMENT = "training/nightly"
MODEL_TAG, VERSION_TAG = "visionops.drift.model", "visionops.drift.version"
WINDOW_END_TAG = "visionops.drift.window_end"  # the last judged window's newest row time (ISO 8601)
TRIGGERED_TAG = "visionops.drift.triggered_flow_run"  # the training flow run the drift started last
HISTORY_CHART = "drift_history.png"


def log_uri(params, root: Path) -> str | None:
    """Where the served models log: VISIONOPS_LOG_URI when set (empty: off), else monitor.log_uri (a relative
    directory is under the project)."""
    from visionops.monitoring.served_log import LOG_URI_ENV

    uri = os.environ.get(LOG_URI_ENV, params.monitor.log_uri)
    if not uri:
        return None
    return uri if "://" in uri or os.path.isabs(uri) else str(root / uri)


def drift_run(client, experiment_id: str, name: str, version: str):
    """The MLflow run of this model version's drift windows, created on its first window."""
    runs = client.search_runs([experiment_id], f"tags.`{MODEL_TAG}` = '{name}' and tags.`{VERSION_TAG}` = '{version}'",
                              max_results=1)
    if runs:
        return runs[0]
    return client.create_run(experiment_id, run_name=f"{name} v{version}", tags={MODEL_TAG: name, VERSION_TAG: version})


def window_name(end: pd.Timestamp) -> str:
    """A window's report name, after its newest row's time (UTC, no colons)."""
    return f"{end:%Y-%m-%dT%H-%M-%S.%fZ}"


@task(name="read-window", task_run_name="read-window", cache_policy=NO_CACHE, persist_result=False)
def read_window(uri: str, sha256: str, since: str | None, settings) -> tuple[pd.DataFrame, int]:
    """(the newest `window_rows` log rows of the version after `since` that have surely reached the log, how
    many such rows there were)."""
    from visionops.monitoring.inference_log import read_log

    until = datetime.now(timezone.utc) - timedelta(seconds=2 * settings.flush_seconds)
    rows = read_log(uri, since=datetime.fromisoformat(since) if since else None, until=until, model_sha256=sha256)
    return rows.tail(settings.window_rows).reset_index(drop=True), len(rows)


@task(name="judge-window", task_run_name="judge-window", cache_policy=NO_CACHE, persist_result=False)
def judge(model_uri: str, window: pd.DataFrame, task_name: str, settings, report_path: Path):
    """The window's verdict against the version's reference, and its HTML report at `report_path`."""
    import mlflow

    from visionops.monitoring.drift import judge_window
    from visionops.monitoring.reference import load_reference
    from visionops.monitoring.report import write_report

    metadata = mlflow.models.get_model_info(model_uri).metadata or {}
    reference = load_reference(model_uri)
    verdict = judge_window(reference, window, task=metadata.get("task", task_name),
                           class_names=list(metadata.get("class_names", [])), settings=settings)
    write_report(verdict, reference, window, report_path, title=f"{model_uri} window {window_name(window['time'].max())}")
    return verdict


def metric_history(client, run_id: str, keys) -> pd.DataFrame:
    """The run's metrics by window: one row per step, one column per key."""
    rows: dict[int, dict] = {}
    for key in keys:
        for m in client.get_metric_history(run_id, key):
            rows.setdefault(m.step, {})[key] = m.value
    return pd.DataFrame.from_dict(rows, orient="index").sort_index()


@task(name="record-window", task_run_name="record-window", cache_policy=NO_CACHE, persist_result=False)
def record(client, run_id: str, verdict, report_path: Path, end: pd.Timestamp) -> tuple[int, pd.DataFrame]:
    """Log the window to its MLflow run (metrics at the next step, the report, the history chart, its end);
    returns (its step, the run's history of metrics by window)."""
    import time

    from mlflow.entities import Metric

    from visionops.monitoring.report import write_history

    step = len(client.get_metric_history(run_id, "drifted"))
    now = int(time.time() * 1000)
    metrics = verdict.metrics()
    client.log_batch(run_id, metrics=[Metric(k, v, now, step) for k, v in metrics.items()])
    client.log_artifact(run_id, str(report_path), artifact_path="windows")
    history = metric_history(client, run_id, metrics)
    chart = report_path.parent / HISTORY_CHART
    write_history(history, chart)
    client.log_artifact(run_id, str(chart))
    client.set_tag(run_id, WINDOW_END_TAG, end.isoformat())
    return step, history


def in_progress(flow_run_id: str | None) -> str | None:
    """The state name of the flow run when it has not ended (scheduled, pending, running, paused), else None."""
    if not flow_run_id:
        return None
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        state = client.read_flow_run(flow_run_id).state
    return None if state is None or state.is_final() else state.name


@task(name="trigger-training", task_run_name="trigger-training", cache_policy=NO_CACHE, persist_result=False)
def trigger(client, run, root: Path, history: pd.DataFrame, windows: int) -> dict:
    """Run the training deployment when the last `windows` windows all drifted and no run this version's drift
    started is still in progress; returns what was decided (and the new flow run's id)."""
    from prefect.deployments import run_deployment

    drifted = history["drifted"].tolist()
    if len(drifted) < windows or not all(drifted[-windows:]):
        streak = next((i for i, d in enumerate(reversed(drifted)) if not d), len(drifted))
        return {"triggered": False, "reason": f"{streak} drifted window(s) in a row; {windows} start retraining"}
    earlier = run.data.tags.get(TRIGGERED_TAG)
    state = in_progress(earlier)
    if state:
        return {"triggered": False, "reason": f"training flow run {earlier} started by this drift is still {state}"}
    cause = f"drift:{run.info.run_id}"
    flow_run = run_deployment(TRAINING_DEPLOYMENT, timeout=0, parameters={
        "project_dir": str(root), "refresh_data": True, "promote": True, "cause": cause})
    client.set_tag(run.info.run_id, TRIGGERED_TAG, str(flow_run.id))
    get_run_logger().warning("%d drifted windows in a row: started %s flow run %s (cause %s)",
                             windows, TRAINING_DEPLOYMENT, flow_run.id, cause)
    return {"triggered": True, "flow_run_id": str(flow_run.id), "cause": cause,
            "reason": f"the last {windows} windows drifted"}


def markdown(summary: dict, verdict) -> str:
    out = [f"# Drift: {summary['verdict']}", "",
           f"Model `{summary['model']}` v{summary['version']} (alias `{summary['alias']}`), log `{summary['log_uri']}`, "
           f"flow run `{summary['flow_run_id']}`.", ""]
    if verdict is None:
        return "\n".join([*out, summary["reason"]]) + "\n"
    rows = [[name, t["statistic"], t["p_value"], verdict.threshold, "yes" if t["drifted"] else "no"]
            for name, t in verdict.tests.items()]
    q, est = verdict.quality, verdict.estimate
    rows.append(["error rate", q["error_rate"], None, q["max_error_rate"], "yes" if q["error_rate_drifted"] else "no"])
    out += [_table(["test", "statistic", "p-value", "threshold", "drifted"], rows), "",
            f"Label-free {est['metric']} ({est['method']}): {est['estimate']:.4f} against the reference's "
            f"{est['reference']:.4f}; {verdict.n_window} rows ({summary['new_rows']} new).", "",
            f"MLflow: experiment `{EXPERIMENT}`, run `{summary['mlflow_run_id']}`, window {summary['window']} "
            f"(step), report artifact `{summary['report']}`.", "",
            f"Trigger: {summary['trigger']['reason']}"
            + (f"; training flow run `{summary['trigger']['flow_run_id']}`, cause `{summary['trigger']['cause']}`"
               if summary["trigger"]["triggered"] else "")]
    return "\n".join(out) + "\n"


@flow(name="drift", description="The newest window of the inference log against the champion's reference; "
                                "persistent drift starts the training deployment.")
def drift(project_dir: str = ".", model_name: str | None = None, alias: str = "champion") -> dict:
    """Judge the newest window of `model_name`@`alias`'s log rows (default: params.yaml's teacher model), record
    it in MLflow (`visionops-drift`) and start retraining when drift persists (see the module docstring)."""
    import mlflow
    from mlflow.exceptions import MlflowException

    from visionops.serving.registered import WEIGHTS_SHA256_TAG
    from visionops.tracking.store import configure

    logger = get_run_logger()
    root = Path(project_dir).resolve()
    params = _params(root)
    if not params.mlflow.enabled:
        raise RuntimeError("mlflow.enabled is false in params.yaml: there is no registry to find the served model in")
    _quiet_mlflow_downloads()
    experiment_id = configure(params.mlflow.model_copy(update={"experiment": EXPERIMENT}), root)
    client = mlflow.MlflowClient()
    name = model_name or params.mlflow.teacher_model_name
    try:
        version = client.get_model_version_by_alias(name, alias)
    except MlflowException:
        raise NoChampionError(f"model {name!r} has no version with the alias {alias!r}: nothing serves to watch") from None
    sha256 = (version.tags or {}).get(WEIGHTS_SHA256_TAG)
    if not sha256:
        raise NoChampionError(f"{name} v{version.version} has no tag {WEIGHTS_SHA256_TAG}: its log rows cannot be told apart")
    uri = log_uri(params, root)
    summary = {"model": name, "version": str(version.version), "alias": alias, "log_uri": uri,
               "flow_run_id": str(current_flow_run.id), "window": None, "verdict": "no window"}
    if uri is None:
        summary["reason"] = "the inference log is off (monitor.log_uri null, or VISIONOPS_LOG_URI empty)"
    else:
        run = drift_run(client, experiment_id, name, str(version.version))
        summary["mlflow_run_id"] = run.info.run_id
        window, summary["new_rows"] = read_window(uri, sha256, run.data.tags.get(WINDOW_END_TAG), params.monitor)
        if summary["new_rows"] < params.monitor.min_window_rows:
            summary["reason"] = (f"{summary['new_rows']} new log rows of {name} v{version.version} since the last "
                                 f"window; a window needs monitor.min_window_rows {params.monitor.min_window_rows}")
    if "reason" in summary:
        logger.info("no window: %s", summary["reason"])
        create_markdown_artifact(markdown=markdown(summary, None), key=DRIFT_ARTIFACT, description="drift: no window")
        return summary
    end = window["time"].max()
    with tempfile.TemporaryDirectory(prefix="visionops-drift-") as tmp:
        report = Path(tmp) / f"{window_name(end)}.html"
        verdict = judge(f"models:/{name}/{version.version}", window, params.task, params.monitor, report)
        step, history = record(client, run.info.run_id, verdict, report, end)
    summary.update(window=step, verdict="DRIFTED" if verdict.drifted else "no drift", metrics=verdict.metrics(),
                   report=f"windows/{report.name}", window_end=end.isoformat())
    logger.info("window %d of %s v%s (%d rows, end %s): %s", step, name, version.version, verdict.n_window,
                summary["window_end"], summary["verdict"])
    summary["trigger"] = trigger(client, client.get_run(run.info.run_id), root, history, params.monitor.windows_to_trigger)
    create_markdown_artifact(markdown=markdown(summary, verdict), key=DRIFT_ARTIFACT,
                             description=f"drift window {step} of {name} v{version.version}: {summary['verdict']}")
    return summary
