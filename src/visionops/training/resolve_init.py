"""`train.init` resolved to what it names now, without torch or MLflow (the `resolve_init` stage runs on every
`dvc repro`): a registered model's alias to its version (read from the registry: `serving.registered`), a model
file to its MD5. models/init.json holds the result and is rewritten only when it changes; train depends on it.
"""

from __future__ import annotations

import json
from pathlib import Path

from visionops import layout
from visionops.atomic import write_bytes
from visionops.config import REGISTERED_INIT, MlflowConfig
from visionops.errors import InvalidInputError, MissingInputError

INIT_FILE = layout.MODELS / "init.json"


def resolve(init: str, mlflow_cfg: MlflowConfig, data_root: str | None = None, root: Path | str = ".") -> dict:
    """`init` as it stands now: a registered model's name, resolved version, run id and file MD5; a file's
    MD5; otherwise just `init`. What models/init.json holds."""
    from visionops.data.fetch import file_md5

    found = REGISTERED_INIT.fullmatch(init)
    if found is None:
        if init in ("scratch", "imagenet", "pretrain"):
            return {"init": init}
        return {"init": init, "md5": file_md5(model_path(init, root, data_root))}
    from visionops.serving.registered import MODEL_MD5_TAG, reader

    name, alias = found["name"], found["alias"]
    read = reader(mlflow_cfg, Path(root).resolve())
    version = found["version"] if read is None or alias is None else read.alias(name, alias)
    tags = read.tags(name, version) if read is not None and version is not None else {}
    if not tags:
        what = f"no version of {name!r} holds alias {alias!r}" if alias else f"{name!r} has no version {version}"
        raise MissingInputError(f"train.init: {init}: {what} in the MLflow registry ({mlflow_cfg.tracking_uri or 'the project store'})")
    return {"init": init, "name": name, "version": str(version), "run_id": tags.get("run_id"), "md5": tags.get(MODEL_MD5_TAG)}


def write_resolved(init: str, mlflow_cfg: MlflowConfig, data_root: str | None = None, path: Path = INIT_FILE) -> dict:
    """Write `resolve(init)` to `path` only when it differs (atomically): the same resolution leaves the same
    bytes and mtime, so DVC sees train's dependency change only when the starting point did."""
    record = resolve(init, mlflow_cfg, data_root)
    data = (json.dumps(record, indent=2, sort_keys=True) + "\n").encode()
    if not (path.is_file() and path.read_bytes() == data):
        write_bytes(path, data)
    return record


def resolved(init: str, mlflow_cfg: MlflowConfig, data_root: str | None = None) -> dict:
    """models/init.json when it resolves this very `init` (the pipeline's resolve_init stage wrote it),
    else `train.init` resolved now (a `visionops train` outside `dvc repro`)."""
    if INIT_FILE.is_file():
        record = json.loads(INIT_FILE.read_text())
        if record.get("init") == init:
            return record
    return resolve(init, mlflow_cfg, data_root)


def model_path(init: str, root: Path | str, data_root: str | None = None) -> Path:
    """The model file `init` names, resolved; refused outside the project (`root`) and data.root."""
    path = Path(init).expanduser()
    full = (Path(root) / path if not path.is_absolute() else path).resolve()
    inside = [Path(root).resolve(), *([Path(data_root).expanduser().resolve()] if data_root else [])]
    if not any(full.is_relative_to(r) for r in inside):
        raise InvalidInputError(f"train.init: {init} resolves to {full}, outside the project and data.root: "
                                "copy the model file into the project")
    if full in ((Path(root) / layout.TEACHER).resolve(), (Path(root) / layout.STUDENT).resolve()):
        raise InvalidInputError(f"train.init: {init} is an output of this pipeline (train would start from its own "
                                "last result on every run); start from a registered version (models:/<name>@<alias>) "
                                "or a copy of the file")
    if not full.is_file():
        raise MissingInputError(f"train.init: {init}: no such model file (scratch, imagenet, pretrain, "
                                "models:/<name>@<alias> and models:/<name>/<version> are the other starting points)")
    return full
