"""The weights a training run starts from (`train.init`), loaded into the freshly built network, and their record.

- `scratch`: nothing is loaded (the seeded random weights).
- `imagenet`: torchvision's ImageNet weights (`models.imagenet`).
- `models:/<name>@<alias>` / `models:/<name>/<version>`: a version of this project's registry, of any task.
  `training.resolve_init` turns it into a version (the `resolve_init` stage writes that to models/init.json,
  which train depends on, so an alias that moved shows in `dvc status`); train loads exactly that version.
- `pretrain`: the encoder in models/backbone.pt (`{"task": "backbone", "arch": ..., "encoder": <canonical
  names>}`, written by the pretrain stage).
- a path: a visionops model file inside the project or data.root.

The same architecture and task load the whole network; otherwise the encoder moves by canonical name
(`models.encoders`). Tensors that depend on the number of classes (the head) are not loaded when the classes
differ; tensors whose shapes differ are skipped and reported; a first conv made for RGB that meets a
greyscale network is loaded with its RGB weights summed (what a grey image repeated to RGB would see).
"""

from __future__ import annotations

import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from visionops import layout
from visionops.config import REGISTERED_INIT, MlflowConfig, TrainConfig
from visionops.errors import InvalidInputError, MissingInputError
from visionops.models import create_model, model_file
from visionops.models.encoders import from_canonical, to_canonical
from visionops.training.resolve_init import model_path, resolved

BACKBONE_FILE = layout.MODELS / "backbone.pt"  # the pretrain stage's encoder


@dataclass
class Start:
    """Weights to start from: a bare network's state dict of `arch` (or its encoder under canonical names)."""

    state: dict[str, Tensor]
    arch: str
    task: str
    class_names: list[str] | None  # None: classes unknown or unrelated (ImageNet's): the head is never loaded
    canonical: bool
    record: dict  # the lineage: what `train.init` named, and its identity (hash, version, run id)


def _from_model_file(path: Path, record: dict) -> Start:
    info = model_file.load_weights_only(path, "train.init loads only visionops model files")
    if "state_dict" not in info or "arch" not in info:
        raise InvalidInputError(f"train.init: {path} is not a visionops model file (no arch and state_dict)")
    state = {k.removeprefix("net."): v for k, v in info["state_dict"].items() if k.startswith("net.")}
    task = info.get("task", "classification")
    record = {**record, "arch": info["arch"], "task": task}
    return Start(state, info["arch"], task, list(info.get("class_names", [])) or None, False, record)


def _registered(record: dict, mlflow_cfg: MlflowConfig) -> Start:
    import mlflow

    from visionops.data.fetch import file_md5
    from visionops.tracking.store import tracking_uri

    mlflow.set_tracking_uri(tracking_uri(mlflow_cfg))
    with tempfile.TemporaryDirectory(prefix="visionops-init-") as tmp:
        local = Path(mlflow.artifacts.download_artifacts(f"models:/{record['name']}/{record['version']}", dst_path=tmp))
        files = sorted((local / "artifacts").glob("*.pt"))
        if len(files) != 1:
            raise InvalidInputError(f"train.init: {record['init']}: version {record['version']} holds no visionops model file")
        if record.get("md5") and file_md5(files[0]) != record["md5"]:
            raise InvalidInputError(f"train.init: {record['init']}: the file of version {record['version']} is not the one "
                                    f"registered (MD5 {file_md5(files[0])}, tag {record['md5']})")
        return _from_model_file(files[0], record)


def load(cfg: TrainConfig, mlflow_cfg: MlflowConfig, data_root: str | None = None) -> Start | None:
    """The weights `cfg.init` names (None for scratch)."""
    from visionops.data.fetch import file_md5

    init = cfg.init
    if init == "scratch":
        return None
    if init == "imagenet":
        from visionops.models import imagenet

        state, arch, identity = imagenet.load(cfg.model)
        return Start(state, arch, "classification", None, False, {"init": init, **identity, "arch": arch})
    if init == "pretrain":
        if not BACKBONE_FILE.is_file():
            raise MissingInputError(f"train.init: pretrain: {BACKBONE_FILE} is missing (run the pretrain stage)")
        info = model_file.load_weights_only(BACKBONE_FILE, "rerun the pretrain stage")
        if info.get("task") != "backbone" or not info.get("encoder"):
            raise InvalidInputError(f"train.init: pretrain: {BACKBONE_FILE} holds no pretrained encoder (is pretraining "
                                    "switched off?)")
        record = {"init": init, "file": str(BACKBONE_FILE), "md5": file_md5(BACKBONE_FILE), "arch": info["arch"]}
        return Start(info["encoder"], info["arch"], "backbone", None, True, record)
    if REGISTERED_INIT.fullmatch(init):
        return _registered(resolved(cfg.init, mlflow_cfg, data_root), mlflow_cfg)
    path = model_path(init, ".", data_root)
    return _from_model_file(path, {"init": init, "md5": file_md5(path)})


def class_dependent(arch: str, in_channels: int, num_classes: int, image_size: int) -> set[str]:
    """The state-dict keys of `arch` whose shapes depend on the number of classes (its head)."""
    with torch.device("meta"):
        a = create_model(arch, in_channels=in_channels, num_classes=num_classes, image_size=image_size).state_dict()
        b = create_model(arch, in_channels=in_channels, num_classes=num_classes + 1, image_size=image_size).state_dict()
    return {k for k in a if a[k].shape != b[k].shape}


def transfer(net: nn.Module, arch: str, task: str, class_names: list[str], image_shape, start: Start) -> dict:
    """Load `start` into `net` (a bare network of `arch`, freshly built); returns what was loaded, what stays
    new and what was skipped, by layer (module), with the tensor names loaded under "tensors"."""
    own = net.state_dict()
    whole = not start.canonical and start.arch == arch and start.task == task
    if whole:
        offered = dict(start.state)
    else:
        offered = from_canonical(start.state if start.canonical else to_canonical(start.state, start.arch), arch)
    head = set()
    if start.class_names != list(class_names):
        head = class_dependent(arch, image_shape[2], len(class_names), image_shape[0])
    loaded, skipped, summed = {}, {}, []
    for key, value in offered.items():
        if key not in own or key in head:
            continue
        target = own[key]
        if value.shape == target.shape:
            loaded[key] = value
        elif value.ndim == 4 and value.shape[1] == 3 and target.shape == (value.shape[0], 1, *value.shape[2:]):
            loaded[key], summed = value.sum(1, keepdim=True), [*summed, key]
        else:
            skipped[key] = f"{list(value.shape)} in the start, {list(target.shape)} here"
    with torch.no_grad():
        for key, value in loaded.items():
            own[key].copy_(value.to(own[key].dtype))
    layers = _layers(own, loaded, skipped)
    return {
        **start.record,
        "loaded_from": "the whole network" if whole else "the encoder (canonical names)",
        "head_reinitialised": sorted({k.rsplit(".", 1)[0] for k in head}),
        **layers,
        "rgb_summed": summed,
        "tensors_loaded": len(loaded),
        "tensors_new": len(own) - len(loaded),
        "tensors": sorted(loaded),
    }


def _layers(own: dict, loaded: dict, skipped: dict) -> dict:
    by_layer: dict[str, list[str]] = {}
    for key in own:
        by_layer.setdefault(key.rsplit(".", 1)[0] if "." in key else key, []).append(key)
    out = {"loaded": [], "new": [], "skipped": {}}
    for layer, keys in by_layer.items():
        if any(k in skipped for k in keys):
            out["skipped"][layer] = next(skipped[k] for k in keys if k in skipped)
        elif all(k in loaded for k in keys):
            out["loaded"].append(layer)
        else:
            out["new"].append(layer)
    return out


def start_network(net: nn.Module, arch: str, task: str, class_names: list[str], image_shape, start: Start | None) -> dict:
    """Load `start` (`load`) into `net` and say on stderr what moved; returns the record (details.json, MLflow)."""
    if start is None:
        return {"init": "scratch"}
    report = transfer(net, arch, task, class_names, image_shape, start)
    init = start.record["init"]
    if not report["tensors_loaded"]:
        raise InvalidInputError(f"train.init: {init}: nothing of it fits {arch} (a {start.task} {start.arch}): "
                                f"{len(report['skipped'])} layers of other shapes, none with the same names")
    skipped = "; ".join(f"{k} ({v})" for k, v in report["skipped"].items())
    print(f"train: started from {init} ({report['loaded_from']} of a {start.task} {start.arch}): "
          f"{len(report['loaded'])} layers loaded, {len(report['new'])} new"
          + (f" (head re-initialised: {', '.join(report['head_reinitialised'])})" if report["head_reinitialised"] else "")
          + (f", {len(report['skipped'])} skipped for their shapes: {skipped}" if skipped else ""), file=sys.stderr)
    return report


def normalisation(start: Start | None, channels: int) -> tuple[list[float], list[float]] | None:
    """The mean and std the model normalises with when they follow from the start: ImageNet's, whose first layers
    and batch-norm statistics were fitted to images normalised so. None: the train images' own (every other start)."""
    if start is None or start.record["init"] != "imagenet":
        return None
    from visionops.models import imagenet

    return imagenet.normalisation(channels)


def identity(start: Start | None) -> tuple:
    """What identifies the weights started from (hashes, registry version): a checkpoint of a run that started
    elsewhere is not resumed."""
    record = start.record if start is not None else {}
    return tuple(record[k] for k in ("sha256", "md5", "version") if k in record)


def transferred(report: dict, prefix: str = "net.") -> frozenset[str]:
    """The parameter names (in the wrapper, `prefix` + the net's) the starting point gave."""
    return frozenset(prefix + k for k in report.get("tensors", ()))
