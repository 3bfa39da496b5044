"""One MLflow run per stage execution, nested under its pipeline run and tagged with its lineage.

The stage cores know nothing of MLflow: the CLI wraps each core in `track_stage` and hands the core
plain callbacks (`log_epoch`).
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator
from pathlib import Path

from visionops.config import Params
from visionops.tracking import lineage
from visionops.tracking.store import configure, project_root

ROLE_TAG, PIPELINE_TAG = "visionops.role", "visionops.pipeline_run_id"


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

    def __init__(self, run_id: str, stage: str, lineage_tags: dict[str, str]):
        self.run_id, self.stage, self.lineage_tags = run_id, stage, lineage_tags

    def log_epoch(self, desc: str, row: dict) -> None:
        """Per-epoch curves, step = epoch; the distill stage prefixes its two students."""
        import mlflow

        prefix = "" if desc == "train" else desc.replace(" ", "_") + "/"
        mlflow.log_metrics({f"{prefix}{k}": float(v) for k, v in row.items() if k != "epoch"}, step=int(row["epoch"]))

    def log_result(self, result: dict, reports_dir: Path | None = None) -> None:
        """Final metrics, and every file the stage wrote under `reports_dir` as artifacts."""
        import mlflow

        mlflow.log_metrics(numeric(result))
        if reports_dir is not None and Path(reports_dir).exists():
            mlflow.log_artifacts(str(reports_dir), artifact_path=Path(reports_dir).name)

    def register(self, model_path: Path, registered_name: str, extra_tags: dict[str, str] | None = None):
        """Log the model into this run and register it as a new version with the alias `challenger`."""
        from visionops.registry.pyfunc import log_classifier

        tags = {**self.lineage_tags, "visionops.stage": self.stage, **(extra_tags or {})}
        return log_classifier(model_path, registered_name, tags=tags)


def _pipeline_parent(client, experiment_id: str, pipeline_id: str, tags: dict[str, str]) -> str:
    """The parent run grouping this pipeline run's stages (created by its first stage)."""
    found = client.search_runs(
        [experiment_id], f"tags.`{PIPELINE_TAG}` = '{pipeline_id}' and tags.`{ROLE_TAG}` = 'pipeline'", max_results=1
    )
    if found:
        return found[0].info.run_id
    run = client.create_run(experiment_id, run_name=f"pipeline {pipeline_id}", tags={**tags, ROLE_TAG: "pipeline"})
    return run.info.run_id


def _dataset_input(root: Path, hashes: dict[str, str], commit: str):
    from mlflow.data.meta_dataset import MetaDataset

    from visionops.tracking.dvc_source import DVCDatasetSource

    md5 = hashes["data/dataset"]
    return MetaDataset(DVCDatasetSource("data/dataset", md5, commit), name=f"{root.name}-dataset", digest=md5[:16])


@contextlib.contextmanager
def track_stage(stage: str, params: Params, sections: tuple[str, ...]) -> Iterator[StageRun | None]:
    """Run the block inside an MLflow run for `stage` (None when tracking is off or on a non-zero DDP rank)."""
    if not params.mlflow.enabled or int(os.environ.get("RANK", "0")) != 0:
        yield None
        return
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
    parent_id = _pipeline_parent(client, experiment_id, pipeline_id, common)
    lineage_tags = {**common, "dvc.data_version": lineage.data_version(hashes)}
    tags = {
        **lineage_tags,
        ROLE_TAG: "stage",
        "visionops.stage": stage,
        "mlflow.parentRunId": parent_id,
        **{f"dvc.dep.{path}": md5 for path, md5 in hashes.items()},
    }
    dump = params.model_dump(by_alias=True)
    status = "FAILED"
    try:
        with mlflow.start_run(experiment_id=experiment_id, run_name=stage, tags=tags) as run:
            mlflow.log_params(flatten({s: dump[s] for s in sections}))
            if "data/dataset" in hashes:
                mlflow.log_input(_dataset_input(root, hashes, git["commit"]), context=stage)
            yield StageRun(run.info.run_id, stage, lineage_tags)
            status = "FINISHED"
    finally:
        client.set_terminated(parent_id, status)
