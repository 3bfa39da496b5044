"""One MLflow run per stage execution, nested under its pipeline run and tagged with its lineage.

The stage cores know nothing of MLflow: the CLI wraps each core in `track_stage` and hands the core
plain callbacks (`log_epoch`). A stage that logs only its result (no epochs, no models) has its run
kept by a helper process (`BackgroundRun`): importing MLflow and opening the run take ~2.5 s, which
then happen on the other core while the stage works (threads would not help: both halves hold the GIL).
After a crash the store still tells the truth: see `visionops.tracking.faults`.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

from visionops.config import Params
from visionops.process_settings import tune_gc
from visionops.tracking import faults, lineage
from visionops.tracking.store import configure, project_root

ROLE_TAG, PIPELINE_TAG = "visionops.role", "visionops.pipeline_run_id"
PIPELINE_NAME_TAG, EXPERIMENT_TAG = "visionops.pipeline_name", "visionops.experiment"
INIT_TAG = "visionops.init"  # the train run's starting point (`StageRun.log_init`)
INIT_IDENTITY = ("init", "weights", "file", "sha256", "name", "version", "run_id", "md5", "arch", "task")
DEPS_ARTIFACT = "dvc_deps.json"  # each dependency's hash as DVC sees it
# MLflow has no metric descriptions: a training stage's run says in its description what its timings measure
TIMING_NOTE = (
    "train_seconds: the training run's wall time, the sum of its epochs' epoch_seconds (those before a resume "
    "included). Each epoch's time covers its optimisation steps and the validation pass after them "
    "(epoch_train_seconds: the steps alone); not loading data, building the model or the final evaluation. "
    "train_images_per_second: training images x epochs / train_seconds."
)


def flatten(obj: object, prefix: str = "") -> dict[str, object]:
    if isinstance(obj, dict):
        out: dict[str, object] = {}
        for key, value in obj.items():
            out.update(flatten(value, f"{prefix}{key}."))
        return out
    return {prefix.rstrip("."): obj}


def numeric(result: dict) -> dict[str, float]:
    return {k: float(v) for k, v in flatten(result).items() if isinstance(v, int | float) and not isinstance(v, bool)}


class StageRun:
    """Logging handle for the active stage run."""

    def __init__(self, run_id: str, stage: str, lineage_tags: dict[str, str], resume: faults.ResumeLink | None = None):
        self.run_id, self.stage, self.lineage_tags, self.resume = run_id, stage, lineage_tags, resume

    def log_epoch(self, desc: str, row: dict) -> None:
        """Per-epoch curves, step = epoch; the distill stage prefixes its two students.

        Called after the epoch's checkpoint is written: a resumed run is linked to the one it continues.
        """
        import mlflow

        if self.resume is not None:
            self.resume.on_epoch(desc, int(row["epoch"]))
        prefix = "" if desc == "train" else desc.replace(" ", "_") + "/"
        mlflow.log_metrics({f"{prefix}{k}": float(v) for k, v in row.items() if k != "epoch"}, step=int(row["epoch"]))

    def log_init(self, init: dict) -> None:
        """The starting point (`training.starting_point`): tags `visionops.init` (what train.init named) and
        `visionops.init.source` (its identity: weights and file hash, registry version and run id, or file
        hash). Not a model input: MLflow accepts those only on Databricks."""
        import mlflow

        source = {k: v for k, v in init.items() if k in INIT_IDENTITY}
        mlflow.set_tags({INIT_TAG: init["init"], f"{INIT_TAG}.source": json.dumps(source, sort_keys=True)})

    def log_result(self, result: dict, reports_dir: Path | None = None) -> None:
        """Final metrics, and every file the stage wrote under `reports_dir` as artifacts."""
        import mlflow

        mlflow.log_metrics(numeric(result))
        if "train_seconds" in result:
            mlflow.set_tag("mlflow.note.content", TIMING_NOTE)
        if reports_dir is not None and Path(reports_dir).exists():
            mlflow.log_artifacts(str(reports_dir), artifact_path=Path(reports_dir).name)


def _pipeline_parent(client, experiment_id: str, pipeline_id: str, name: str, tags: dict[str, str]) -> tuple[str, str]:
    """The parent run grouping this pipeline run's stages (created, called `name`, by its first stage),
    RUNNING again while a stage runs unless a stage already failed or was killed; (run id, run name)."""
    found = client.search_runs(
        [experiment_id], f"tags.`{PIPELINE_TAG}` = '{pipeline_id}' and tags.`{ROLE_TAG}` = 'pipeline'", max_results=1
    )
    if not found:
        owner = faults.pipeline_owner_tags(pipeline_id)
        tags = {**tags, **owner, ROLE_TAG: "pipeline", PIPELINE_NAME_TAG: name}
        return client.create_run(experiment_id, run_name=name, tags=tags).info.run_id, name
    if faults.SEVERITY.get(found[0].info.status, 3) < faults.SEVERITY["KILLED"]:
        client.update_run(found[0].info.run_id, status="RUNNING")
    return found[0].info.run_id, found[0].info.run_name


def _dataset_input(root: Path, hashes: dict[str, str], commit: str):
    from mlflow.data.meta_dataset import MetaDataset

    from visionops.tracking.dvc_source import DVCDatasetSource

    md5 = hashes["data/dataset"]
    return MetaDataset(DVCDatasetSource("data/dataset", md5, commit), name=f"{root.name}-dataset", digest=md5[:16])


@contextlib.contextmanager
def _mlflow_run(
    stage: str, params: Params, sections: tuple[str, ...], owner_pid: int | None = None, resumable: bool = False
) -> Iterator[StageRun]:
    """The stage's run: under its pipeline parent, with lineage tags, params and dataset.

    `owner_pid` is the stage's process (default: this one); runs of processes that died are ended first.
    A `resumable` stage (one that checkpoints) links its run to the run whose checkpoint it resumes.
    """
    import mlflow

    root = project_root()
    experiment_id = configure(params.mlflow, root)
    client = mlflow.MlflowClient()
    git = lineage.git_info(root)
    try:
        hashes = lineage.dvc_dep_hashes(root, stage)
    except Exception as exc:  # noqa: BLE001 - lineage is best effort outside a DVC project
        print(f"tracking: no DVC lineage for stage '{stage}': {exc}", file=sys.stderr)
        hashes = {}
    pipeline_id = lineage.pipeline_run_id()
    common = {
        PIPELINE_TAG: pipeline_id,
        "git.commit": git["commit"],
        "git.dirty": git["dirty"],
    }
    flow_run = os.environ.get(lineage.PREFECT_FLOW_RUN_ENV)
    if flow_run:
        common["prefect.flow_run_id"] = flow_run
    experiment = lineage.experiment_name()
    if experiment:
        common[EXPERIMENT_TAG] = experiment
    faults.end_orphans(client, experiment_id)
    name = lineage.pipeline_name(git["commit"], git["dirty"], pipeline_id, stage)
    parent_id, parent_name = _pipeline_parent(client, experiment_id, pipeline_id, name, common)
    lineage_tags = {**common, PIPELINE_NAME_TAG: parent_name, "dvc.data_version": lineage.data_version(hashes)}
    tags = {
        **lineage_tags,
        ROLE_TAG: "stage",
        "visionops.stage": stage,
        "mlflow.parentRunId": parent_id,
        **faults.owner_tags(owner_pid),
    }
    dump = params.model_dump(by_alias=True)
    status = "FAILED"
    try:
        run_name = f"{stage} · {lineage.experiment_label() or parent_name}"  # two runs of one stage side by side differ
        with mlflow.start_run(experiment_id=experiment_id, run_name=run_name, tags=tags) as run:
            if faults.link_retry(client, experiment_id, run.info.run_id, {PIPELINE_TAG: pipeline_id, "visionops.stage": stage}):
                faults.settle_parent(client, parent_id)  # the attempt it retries no longer fails the pipeline
            resume = faults.ResumeLink(client, stage, run.info.run_id) if resumable else None
            mlflow.log_params({"task": params.task, **flatten({s: dump[s] for s in sections})})
            if "data/dataset" in hashes:
                mlflow.log_input(_dataset_input(root, hashes, git["commit"]), context=stage)
            if hashes:  # one artifact, not a tag per dependency (dvc.data_version digests them)
                mlflow.log_dict(hashes, DEPS_ARTIFACT)
            try:
                yield StageRun(run.info.run_id, stage, lineage_tags, resume)
                status = "FINISHED"
            except BaseException as exc:
                status, reason = faults.ending(exc)
                with contextlib.suppress(Exception):  # the stage's own error matters more than this record of it
                    mlflow.set_tag(faults.END_REASON_TAG, reason)
                    mlflow.end_run(status)
                raise
            finally:
                if resume is not None:
                    resume.on_end(status)
    finally:
        faults.settle_parent(client, parent_id)


class BackgroundRun:
    """The run of a stage that logs only its result, kept by a helper process.

    The helper (`python -m visionops.tracking.stage_run`) opens the run while the stage works, then
    logs the result, the report files and the status that the stage hands it at the end.
    """

    def __init__(self, stage: str, params: Params, sections: tuple[str, ...]):
        src = str(Path(__file__).resolve().parents[2])  # the helper imports this very visionops
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, (src, os.environ.get("PYTHONPATH"))))}
        self._helper = subprocess.Popen(
            [sys.executable, "-m", "visionops.tracking.stage_run"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
            start_new_session=True,  # a signal to the stage's group reaches the stage, which reports it; so does death
        )
        request = {
            "stage": stage,
            "params": params.model_dump(mode="json", by_alias=True),
            "sections": sections,
            "owner_pid": os.getpid(),  # the stage's process owns the run, not the helper
        }
        self._helper.stdin.write(json.dumps(request) + "\n")
        self._helper.stdin.flush()
        self._result: dict = {"metrics": {}, "reports_dir": None}

    def wait_open(self) -> None:
        """Wait until the run is open: call it before timing anything the helper's work would slow down."""
        if self._helper.stdout.readline() != "open\n":
            code = self._helper.wait()
            raise RuntimeError(f"tracking: the helper process could not open the MLflow run (exit code {code})")

    def log_result(self, result: dict, reports_dir: Path | None = None) -> None:
        """Final metrics, and every file the stage wrote under `reports_dir` as artifacts (logged at `end`)."""
        self._result = {"metrics": numeric(result), "reports_dir": str(reports_dir) if reports_dir else None}

    def end(self, status: str, reason: str | None = None) -> None:
        """Hand the result, `status` and the `reason` of an unfinished run to the helper and wait for it to
        log them and end the run.

        Raises if the helper failed (it printed why), unless the stage failed: its own error says more.
        """
        self._helper.communicate(json.dumps({**self._result, "status": status, "reason": reason}) + "\n")
        if self._helper.returncode and status == "FINISHED":
            code = self._helper.returncode
            raise RuntimeError(f"tracking: the helper process of the MLflow run failed (exit code {code})")


def _serve_background_run() -> None:
    """The helper behind `BackgroundRun`: open the run, say so on stdout, then log what the stage sends on stdin."""
    import mlflow

    tune_gc()
    ready, sys.stdout = sys.stdout, sys.stderr  # stdout only carries the "open" line
    request = json.loads(sys.stdin.readline())
    params = Params.model_validate(request["params"])
    with _mlflow_run(request["stage"], params, tuple(request["sections"]), request["owner_pid"]) as run:
        with contextlib.suppress(BrokenPipeError):  # the stage process is gone
            ready.write("open\n")
            ready.flush()
        line = sys.stdin.readline()  # empty if the stage process died
        outcome = json.loads(line) if line else {"metrics": {}, "reports_dir": None, "status": "KILLED"}
        run.log_result(outcome["metrics"], outcome["reports_dir"])
        if not line:
            mlflow.set_tag(faults.END_REASON_TAG, "the stage process ended without reporting (killed or crashed)")
        elif outcome.get("reason"):
            mlflow.set_tag(faults.END_REASON_TAG, outcome["reason"])
        if outcome["status"] != "FINISHED":
            mlflow.end_run(outcome["status"])


@contextlib.contextmanager
def track_stage(
    stage: str, params: Params, sections: tuple[str, ...], in_process: bool = True
) -> Iterator[StageRun | BackgroundRun | None]:
    """Run the block inside an MLflow run for `stage` (None when tracking is off or on a non-zero DDP rank).

    `in_process=False` hands the run to a `BackgroundRun`: for stages that log only their result.
    """
    if not params.mlflow.enabled or int(os.environ.get("RANK", "0")) != 0:
        yield None
    elif in_process:
        with faults.sigterm_raises(), _mlflow_run(stage, params, sections, resumable=True) as run:
            yield run
    else:
        with faults.sigterm_raises():
            run = BackgroundRun(stage, params, sections)
            status, reason = "FAILED", None
            try:
                yield run
                status = "FINISHED"
            except BaseException as exc:
                status, reason = faults.ending(exc)
                raise
            finally:
                run.end(status, reason)


if __name__ == "__main__":
    _serve_background_run()
