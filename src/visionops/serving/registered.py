"""The registry's state as the register stage and the flow's "nothing to do" check need it, read fast.

DVC cannot see the registry (the register stage has no outputs), so the stage runs on every `dvc repro`
(`always_changed`) and first asks here whether anything is left to do: whether each model file is
registered already (by its MD5), holds `champion` or `challenger`, and was judged if there is no
champion. A SQLite store is read directly, read-only (~50 ms, where importing MLflow takes seconds);
any other store, or a SQLite schema this does not know, is asked through MLflow.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

CHALLENGER = "challenger"
CHAMPION = "champion"
PREVIOUS = "previous"
EXPERIMENT_TAG = "visionops.experiment"  # the DVC experiment (DVC_EXP_NAME) that registered a version
MODEL_MD5_TAG = "visionops.model_md5"  # content hash of the logged .pt file (links DVC outputs to versions)
WEIGHTS_SHA256_TAG = "visionops.weights_sha256"  # SHA-256 of the logged weights, checked when the model loads
DELETED = "Deleted_Internal"  # MLflow's stage of a deleted version (its tags stay in the store)


@dataclass
class Reader:
    """alias(name, alias) -> version or None; tags(name, version) -> dict; by_md5(name, md5) -> the newest
    live version logged from a file with that MD5, or None."""

    alias: Callable[[str, str], str | None]
    tags: Callable[[str, str], dict]
    by_md5: Callable[[str, str], str | None]


def sqlite_reader(db: Path) -> Reader:
    """A read-only reader of a SQLite MLflow store; sqlite3.Error if its schema is not what it expects."""
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)

    def alias(name: str, a: str) -> str | None:
        row = con.execute("SELECT version FROM registered_model_aliases WHERE name = ? AND alias = ?", (name, a)).fetchone()
        return None if row is None else str(row[0])

    def tags(name: str, version: str) -> dict:
        rows = con.execute("SELECT key, value FROM model_version_tags WHERE name = ? AND version = ?", (name, int(version)))
        return dict(rows.fetchall())

    def by_md5(name: str, md5: str) -> str | None:
        row = con.execute(
            "SELECT max(t.version) FROM model_version_tags t JOIN model_versions v ON v.name = t.name AND "
            "v.version = t.version WHERE t.name = ? AND t.key = ? AND t.value = ? AND v.current_stage != ?",
            (name, MODEL_MD5_TAG, md5, DELETED),
        ).fetchone()
        return None if row[0] is None else str(row[0])

    alias("", "")  # fails now, not later, on another schema
    by_md5("", "")
    return Reader(alias, tags, by_md5)


def mlflow_reader() -> Reader:
    """A reader through the configured MLflow client (any store)."""
    import mlflow
    from mlflow.exceptions import MlflowException

    client = mlflow.MlflowClient()

    def alias(name: str, a: str) -> str | None:
        try:
            return str(client.get_model_version_by_alias(name, a).version)
        except MlflowException:
            return None

    def by_md5(name: str, md5: str) -> str | None:
        try:
            found = client.search_model_versions(f"name = '{name}' and tags.`{MODEL_MD5_TAG}` = '{md5}'")
        except MlflowException:
            return None
        return max((str(v.version) for v in found), key=int, default=None)

    return Reader(alias, lambda name, version: dict(client.get_model_version(name, version).tags or {}), by_md5)


def reader(mlflow_cfg, project_dir: Path | None = None) -> Reader | None:
    """The fastest reader of the project's store; None when a SQLite store does not exist yet."""
    from visionops.tracking.store import _sqlite_path, configure, tracking_uri

    db = _sqlite_path(tracking_uri(mlflow_cfg, project_dir))
    if db is not None and not db.is_file():
        return None
    if db is not None:
        try:
            return sqlite_reader(db)
        except sqlite3.Error:
            pass
    configure(mlflow_cfg, project_dir)
    return mlflow_reader()


def registered_already(read: Reader | None, files: dict[str, Path], experiment: str | None) -> list[dict] | None:
    """For each registered name -> model file: {name, version, aliases} when registering it would change
    nothing (the file's content is registered; on the main line it also holds champion or challenger, and
    was judged if the model has no champion); None when some file is still to register, alias or judge."""
    from visionops.data.fetch import file_md5

    if read is None:
        return None
    out = []
    for name, path in files.items():
        if not Path(path).is_file():
            return None  # the register stage names the missing file
        version = read.by_md5(name, file_md5(path))
        if version is None:
            return None
        held = [a for a in (CHAMPION, CHALLENGER) if read.alias(name, a) == version]
        if experiment is None and (not held or (CHAMPION not in held and read.alias(name, CHAMPION) is None
                                                and "promotion.decision" not in read.tags(name, version))):
            return None
        out.append({"name": name, "version": version, "aliases": held})
    return out
