"""An MLflow dataset source that names data by its DVC path and content hash."""

from __future__ import annotations

from typing import Any

from mlflow.data.dataset_source import DatasetSource


class DVCDatasetSource(DatasetSource):
    """`dvc://<path>@<md5>`: the dataset DVC tracks at `path`, at content hash `md5`."""

    def __init__(self, path: str, md5: str, commit: str = ""):
        self.path, self.md5, self.commit = path, md5, commit

    @staticmethod
    def _get_source_type() -> str:
        return "dvc"

    def load(self) -> str:
        return self.path

    @staticmethod
    def _can_resolve(raw_source: Any) -> bool:
        return isinstance(raw_source, str) and raw_source.startswith("dvc://")

    @classmethod
    def _resolve(cls, raw_source: str) -> DVCDatasetSource:
        path, _, md5 = raw_source.removeprefix("dvc://").partition("@")
        return cls(path, md5)

    def to_dict(self) -> dict[str, Any]:
        return {"uri": f"dvc://{self.path}@{self.md5}", "path": self.path, "md5": self.md5, "git_commit": self.commit}

    @classmethod
    def from_dict(cls, source_dict: dict[Any, Any]) -> DVCDatasetSource:
        return cls(source_dict["path"], source_dict["md5"], source_dict.get("git_commit", ""))
