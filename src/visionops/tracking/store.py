"""Where runs are tracked: one SQLite store per project unless MLFLOW_TRACKING_URI says otherwise."""

from __future__ import annotations

import os
from pathlib import Path

from visionops.config import MlflowConfig

DVC_EXPS = (".dvc", "tmp", "exps")


def project_root(cwd: Path | None = None) -> Path:
    """The project's root, also from inside a `dvc exp run --temp/--queue` workspace (.dvc/tmp/exps/...)."""
    cwd = (cwd or Path.cwd()).resolve()
    parts = cwd.parts
    for i in range(len(parts) - len(DVC_EXPS) + 1):
        if parts[i : i + len(DVC_EXPS)] == DVC_EXPS:
            return Path(*parts[:i])
    return cwd


def tracking_uri(cfg: MlflowConfig, root: Path | None = None) -> str:
    """MLFLOW_TRACKING_URI, else mlflow.tracking_uri, else sqlite:///<root>/mlflow.db (waiting on locks)."""
    uri = os.environ.get("MLFLOW_TRACKING_URI") or cfg.tracking_uri
    if uri:
        return uri
    return f"sqlite:///{(root or project_root()) / 'mlflow.db'}?timeout=60"


def artifact_location(root: Path | None = None) -> str:
    return ((root or project_root()) / "mlartifacts").as_uri()


def configure(cfg: MlflowConfig, root: Path | None = None) -> str:
    """Point MLflow at the store and make sure the experiment exists; return its id."""
    import mlflow
    from mlflow.exceptions import MlflowException

    uri = tracking_uri(cfg, root)
    mlflow.set_tracking_uri(uri)
    client = mlflow.MlflowClient()
    exp = client.get_experiment_by_name(cfg.experiment)
    if exp is not None:
        return exp.experiment_id
    location = artifact_location(root) if uri.startswith("sqlite:") else None
    try:
        return client.create_experiment(cfg.experiment, artifact_location=location)
    except MlflowException:  # created meanwhile by a concurrent pipeline
        return client.get_experiment_by_name(cfg.experiment).experiment_id
