"""Stage `train` for detection: fit the teacher on the prepared (repeat-factor sampled) train split,
selected by val mAP@.5.

Writes the model (network + normalisation + class names + the `detection` prediction rule) to
`model_path`, and to `reports_dir`: metrics.json (`HEADLINE`), details.json, measured.json (timings),
and history.csv.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from visionops import measured
from visionops.config import AugmentConfig, DetectionConfig, MlflowConfig, TrainConfig
from visionops.data import dataset
from visionops.errors import InvalidInputError
from visionops.models import count_parameters
from visionops.models.narrow import narrow_into
from visionops.tasks.detection import detector
from visionops.tasks.detection.augment import BoxAugment
from visionops.tasks.detection.objective import METRIC, to_device, val_scorer
from visionops.training import starting_point
from visionops.training.device import select_device
from visionops.training.outputs import fingerprint, run_seconds, write_history
from visionops.training.trainer import Criterion, EpochCallback, fit, init_distributed

HEADLINE = ("best_val_map_50",)


def recorded_augment(prepared_dir: Path) -> AugmentConfig:
    """The augmentation policy `prepare` recorded (training applies exactly this)."""
    return AugmentConfig.model_validate(json.loads((prepared_dir / "policy.json").read_text())["augment"])


def load_train_data(dataset_dir: Path, prepared_dir: Path) -> tuple[dataset.Dataset, np.ndarray, np.ndarray, np.ndarray]:
    """The dataset and the prepared (resampled) train images, boxes and box labels."""
    ds = dataset.load(dataset_dir)
    idx = np.load(prepared_dir / "train_indices.npy")
    split = ds.splits["train"]
    return ds, split.images[idx], split.targets["boxes"][idx], split.targets["box_labels"][idx]


def pixel_stats(images_nhwc: np.ndarray) -> tuple[list[float], list[float]]:
    """Per-channel mean and std in 0..1 units."""
    x = np.asarray(images_nhwc, np.float32).reshape(-1, images_nhwc.shape[-1]) / 255
    return x.mean(0).tolist(), np.maximum(x.std(0), 1e-6).tolist()


def fit_detector(
    arch: str,
    ds: dataset.Dataset,
    train: tuple[np.ndarray, np.ndarray, np.ndarray],
    cfg: TrainConfig,
    augment_cfg: AugmentConfig,
    rule: DetectionConfig,
    checkpoint: Path | None,
    desc: str,
    on_epoch: EpochCallback | None = None,
    criterion_for: Callable[[detector.Detector], Criterion] | None = None,
    extra_fingerprint: object = None,
    start: detector.Detector | None = None,
    init_from: starting_point.Start | None = None,
) -> tuple[detector.Detector, object, dict]:
    """Build `arch` (seeded by cfg.seed), or start it from the strongest channels of `start` (a wider network
    of the same design: `models.narrow`), or from the starting point `init_from` (`starting_point.load`), and
    train it with the trainer's loop; returns (model, state, run facts, with the starting point's record under
    "init"). `criterion_for(model)` replaces the model's own loss (distillation)."""
    device = select_device(cfg.device)
    dist_info = init_distributed(device.type)
    if device.type == "cuda" and dist_info.world_size > 1:
        device = torch.device("cuda", dist_info.rank % torch.cuda.device_count())
    images, boxes, labels = train
    mean, std = starting_point.normalisation(init_from, ds.image_shape[2]) or pixel_stats(images)
    torch.manual_seed(cfg.seed)
    model = detector.build(arch, ds.class_names, ds.image_shape, mean, std, rule)
    init = starting_point.start_network(model.net, arch, "detection", ds.class_names, ds.image_shape, init_from)
    if start is not None:
        try:
            narrow_into(start.net, model.net)
        except ValueError as exc:  # the teacher file was trained on other classes or channels
            raise InvalidInputError(f"distill.init: teacher: the student cannot start from the teacher: {exc}") from exc
    val = ds.splits["val"]
    x, b, lab = to_device(images, boxes, labels, device)
    digest = fingerprint(arch, cfg.model_dump(), augment_cfg.model_dump(), rule.model_dump(), ds.class_names,
                         dist_info.world_size, extra_fingerprint, *starting_point.identity(init_from),
                         arrays=(boxes, labels, val.targets["box_labels"]))
    model, state = fit(
        model,
        (x, (b, lab)),
        val_scorer(to_device(val.images, val.targets["boxes"], val.targets["box_labels"], device), ds.class_names, cfg, device),
        cfg,
        BoxAugment(augment_cfg),
        criterion_for(model) if criterion_for else model.loss,
        device,
        checkpoint=checkpoint,
        fingerprint=digest,
        dist_info=dist_info,
        desc=desc,
        on_epoch=on_epoch,
        metric=METRIC,
        transferred=starting_point.transferred(init),
    )
    facts = {"device": str(device), "world_size": dist_info.world_size, "is_main": dist_info.is_main, "init": init}
    return model.cpu().eval(), state, facts


def run_train(dataset_dir: Path, prepared_dir: Path, cfg: TrainConfig, augment_cfg: AugmentConfig, rule: DetectionConfig,
              model_path: Path, reports_dir: Path, checkpoint: Path, on_epoch: EpochCallback | None = None,
              mlflow_cfg: MlflowConfig = MlflowConfig(), data_root: str | None = None) -> dict:
    ds, images, boxes, labels = load_train_data(dataset_dir, prepared_dir)
    model, state, facts = fit_detector(cfg.model, ds, (images, boxes, labels), cfg, augment_cfg, rule, checkpoint,
                                       "train", on_epoch,
                                       init_from=starting_point.load(cfg, mlflow_cfg, data_root))
    metrics = {
        "model": cfg.model,
        "device": facts["device"],
        "world_size": facts["world_size"],
        "epochs_run": state.epoch, "steps_run": state.steps,
        "best_epoch": state.best_epoch,
        "best_val_map_50": state.best_acc,
        "train_images": len(images),
        "parameters": count_parameters(model),
        **run_seconds(state.history, len(images)),
        "init": facts["init"],
    }
    if facts["is_main"]:
        history = [measured.pure(row) for row in state.history]
        detector.save(model_path, model, cfg.model, ds.class_names, ds.image_shape, history=history,
                      **ds.model_record())
        write_history(history, reports_dir)
        measured.write_reports(reports_dir, metrics, HEADLINE)
        checkpoint.unlink(missing_ok=True)
    return metrics
