"""Whether a `training` flow run would do anything, decided without importing Prefect.

With no Prefect server configured (PREFECT_API_URL unset), a flow run goes to a temporary server that
is started for it and thrown away afterwards: 15-20 s of start-up and shutdown to record a run that no
UI ever shows. So when `dvc status` reports every stage up to date, and every challenger (teacher and
student) was already judged against the champion it would face now, under the same gates (params.yaml
`promote`, recorded in the version's `promotion.metrics` tag), there is nothing to do.
"""

from __future__ import annotations

import os
from pathlib import Path

from pipelines import dvc_stages


def _sqlite_reader(db: Path):
    """Aliases and version tags read straight from a SQLite MLflow store (read-only; ~50 ms instead of
    the seconds that importing MLflow takes). Raises sqlite3.Error if the schema is not what it expects."""
    import sqlite3

    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)

    def alias(name: str, a: str):
        row = con.execute("SELECT version FROM registered_model_aliases WHERE name = ? AND alias = ?", (name, a)).fetchone()
        return None if row is None else str(row[0])

    def tags(name: str, version: str) -> dict:
        rows = con.execute("SELECT key, value FROM model_version_tags WHERE name = ? AND version = ?", (name, int(version)))
        return dict(rows.fetchall())

    return alias, tags


def _mlflow_reader(params, project_dir: Path):
    import mlflow
    from mlflow.exceptions import MlflowException

    from visionops.tracking.store import configure

    configure(params.mlflow, project_dir)
    client = mlflow.MlflowClient()

    def alias(name: str, a: str):
        try:
            return str(client.get_model_version_by_alias(name, a).version)
        except MlflowException:
            return None

    return alias, lambda name, version: dict(client.get_model_version(name, version).tags or {})


def _judged(project_dir: Path) -> list[str] | None:
    """One line per model whose challenger was already judged against today's champion, or None when
    some challenger is still to be judged."""
    import sqlite3

    from visionops.config import load_params
    from visionops.tracking.store import _sqlite_path, tracking_uri

    params = load_params(project_dir / "params.yaml")
    if not params.mlflow.enabled:
        return []
    db = _sqlite_path(tracking_uri(params.mlflow, project_dir))
    if db is not None and not db.is_file():
        return ["no MLflow store yet: nothing registered"]
    try:
        alias, tags = _sqlite_reader(db) if db is not None else _mlflow_reader(params, project_dir)
        return _lines(params, alias, tags)
    except sqlite3.Error:
        alias, tags = _mlflow_reader(params, project_dir)
        return _lines(params, alias, tags)


def _same_gates(t: dict, params) -> bool:
    import json

    try:
        return json.loads(t.get("promotion.metrics", "{}")).get("gates") == json.loads(params.promote.model_dump_json())
    except (ValueError, AttributeError):
        return False


def _lines(params, alias, tags) -> list[str] | None:
    lines = []
    for name in (params.mlflow.teacher_model_name, params.mlflow.student_model_name):
        challenger, champion = alias(name, "challenger"), alias(name, "champion")
        if challenger is None:
            lines.append(f"{name}: no challenger" + (f" (champion v{champion})" if champion else ""))
            continue
        t = tags(name, challenger)
        if ("promotion.decision" not in t or t.get("promotion.previous_champion", "") != (champion or "")
                or not _same_gates(t, params)):
            return None
        lines.append(f"{name}: challenger v{challenger} already {t['promotion.decision']} ({t.get('promotion.timestamp', '?')}) "
                     "against " + (f"champion v{champion}" if champion else "no champion"))
    return lines


def nothing_to_do(project_dir: str | Path, promote: bool, env: dict | None = None) -> str | None:
    """A message saying why no flow run is needed, or None when the flow should run."""
    env = os.environ if env is None else env
    if env.get("PREFECT_API_URL"):
        return None  # a server is configured: run, so the run is visible in its UI
    root = Path(project_dir).resolve()
    if dvc_stages.changed_stages(root) != set():
        return None
    lines = ["nothing to do: `dvc status` says every stage is up to date"]
    if promote:
        judged = _judged(root)
        if judged is None:
            return None
        lines += [f"  {line}" for line in judged]
    lines.append("no flow run started (no Prefect server is configured: `make prefect-ui` records every run; "
                 "--always-run runs it anyway; `python -m pipelines promotion` judges the challengers again)")
    return "\n".join(lines)
