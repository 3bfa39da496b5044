"""Where runs are tracked: one SQLite store per project unless MLFLOW_TRACKING_URI says otherwise."""

from __future__ import annotations

import functools
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


def _sqlite_path(uri: str) -> Path | None:
    if not uri.startswith("sqlite:///"):
        return None
    return Path(uri.removeprefix("sqlite:///").split("?", 1)[0])


@functools.cache
def quiet_mlflow() -> None:
    """Keep MLflow's chatter out of the commands' output: its INFO lines ("Creating initial MLflow database
    tables", "Validating input example"), its prints ("Successfully registered model") and its "Downloading
    artifacts" bars. Its warnings and errors still reach stderr. MLFLOW_LOGGING_LEVEL, when set, rules instead.
    """
    if os.environ.get("MLFLOW_LOGGING_LEVEL"):
        return
    import logging

    from mlflow.utils.autologging_utils import MlflowEventsAndWarningsBehaviorGlobally

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    # MLflow's prints and its log handler share one stream: muted for the whole process, held the way MLflow
    # mutes it for itself (so that its own muting does not unmute it); its warnings go through Python's logging
    MlflowEventsAndWarningsBehaviorGlobally(disable_event_logs=True, disable_warnings=False, reroute_warnings=False).__enter__()
    logger = logging.getLogger("mlflow")
    logger.handlers, logger.propagate = [], True
    logger.setLevel(logging.WARNING)


def configure(cfg: MlflowConfig, root: Path | None = None) -> str:
    """Point MLflow at the store (`quiet_mlflow`) and make sure the experiment exists; return its id.

    With SQLite, artifacts live beside the database in mlartifacts/. A new SQLite store is created (schema migrations) under a file lock, so that two pipelines
    starting at once on a fresh store do not both migrate it.
    """
    import mlflow
    from filelock import FileLock

    quiet_mlflow()
    uri = tracking_uri(cfg, root)
    mlflow.set_tracking_uri(uri)
    db = _sqlite_path(uri)
    if db is None:
        return _experiment_id(mlflow.MlflowClient(), cfg.experiment, None)
    db.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(db) + ".lock", timeout=300):
        return _experiment_id(mlflow.MlflowClient(), cfg.experiment, (db.parent / "mlartifacts").as_uri())


def _experiment_id(client, name: str, location: str | None) -> str:
    """The experiment's id, created if needed, tagged as model training (MLflow's UI then shows its runs, not GenAI)."""
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    tags = {"mlflow.experimentKind": "custom_model_development"}
    return client.create_experiment(name, artifact_location=location, tags=tags)
