"""Stage `train` for segmentation: fit the teacher on the prepared train split, selected by val mIoU.

Writes the model (network + normalisation + class names) to `model_path`, and to `reports_dir`:
metrics.json (`HEADLINE`), details.json, history.csv (and measured.json with the timings).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from visionops import measured
from visionops.config import AugmentConfig, MlflowConfig, TrainConfig
from visionops.data import dataset
from visionops.errors import InvalidInputError
from visionops.models import count_parameters
from visionops.models.narrow import narrow_into
from visionops.tasks.classification.classifier import channel_stats
from visionops.tasks.segmentation import segmenter
from visionops.tasks.segmentation.augment import MaskAugment
from visionops.tasks.segmentation.losses import PixelLoss
from visionops.tasks.segmentation.objective import METRIC, fit_prior_correction, val_scorer
from visionops.training import progressive, starting_point
from visionops.training.device import memory_format, select_device
from visionops.training.outputs import fingerprint, run_seconds, write_history
from visionops.training.trainer import DistInfo, EpochCallback, fit, init_distributed, plan

HEADLINE = ("best_val_miou",)


def recorded_augment(prepared_dir: Path) -> AugmentConfig:
    """The augmentation policy `prepare` recorded (training applies exactly this)."""
    return AugmentConfig.model_validate(json.loads((Path(prepared_dir) / "policy.json").read_text())["augment"])


def _masks_to(masks: np.ndarray, device: torch.device) -> torch.Tensor:
    return torch.from_numpy(np.array(masks, dtype=np.uint8)).to(device)


def _images_to(images: np.ndarray, device: torch.device) -> torch.Tensor:
    return torch.from_numpy(np.array(images)).permute(0, 3, 1, 2).contiguous().to(device)


@dataclass
class Setup:
    """What fitting a segmenter needs (shared by the teacher, the baseline student and the distilled one)."""

    device: torch.device
    dist_info: DistInfo
    ds: dataset.Dataset
    train_data: tuple[torch.Tensor, torch.Tensor]
    val_data: tuple[torch.Tensor, torch.Tensor]
    hard: PixelLoss
    augment: MaskAugment
    mean: list[float]
    std: list[float]
    digest_parts: tuple
    arrays: tuple
    weights: list[float]
    prior_strength: float = 0.0  # of the last fit: see objective.fit_prior_correction
    init: dict | None = None  # of the last fit: its starting point's record (`starting_point.start_network`)

    def fit(self, arch: str, cfg: TrainConfig, criterion, checkpoint: Path | None, digest: str, desc: str,
            on_epoch: EpochCallback | None, start: segmenter.Segmenter | None = None,
            init: starting_point.Start | None = None):
        """Train `arch` from random weights, or from the strongest channels of `start` (a wider network of
        the same design: `models.narrow`), or from the starting point `init` (`starting_point.load`)."""
        torch.manual_seed(cfg.seed)  # the same initial weights for the same arch and seed
        mean, std = starting_point.normalisation(init, self.ds.image_shape[2]) or (self.mean, self.std)
        model = segmenter.build(arch, self.ds.class_names, self.ds.image_shape, mean, std)
        if start is not None:
            narrow_into(start.net, model.net)
        self.init = starting_point.start_network(model.net, arch, "segmentation", self.ds.class_names,
                                                 self.ds.image_shape, init)
        augment = self.augment.to(self.device)
        epochs = plan(cfg, len(self.train_data[0]), self.dist_info.world_size)[1]
        if cfg.progressive_start < 1 and cfg.progressive_epochs >= epochs:
            raise InvalidInputError(f"train.progressive_epochs ({cfg.progressive_epochs}) must be below the {epochs} "
                                    f"epochs train.steps ({cfg.steps}) makes: the last epochs train at the full size")
        sides = progressive.epoch_sides(cfg.progressive_start, cfg.progressive_epochs, epochs, *self.ds.image_shape[:2])
        model, state = fit(model, self.train_data, val_scorer(self.val_data, self.hard, cfg, self.device), cfg,
                           lambda x, masks, gen: augment(x, masks, gen), criterion, self.device, checkpoint=checkpoint,
                           fingerprint=digest, dist_info=self.dist_info, desc=desc, on_epoch=on_epoch, metric=METRIC,
                           on_epoch_start=lambda epoch: setattr(augment, "size", sides[epoch]),
                           transferred=starting_point.transferred(self.init))
        self.prior_strength = fit_prior_correction(model, *self.val_data, self.weights, cfg, self.device)
        return model, state


def load_teacher(teacher_path: Path, s: Setup, channels_last) -> tuple[segmenter.Segmenter, dict]:
    """The trained teacher on the device, in the students' memory format; refused if it was trained on other
    classes or another image shape."""
    teacher, info = segmenter.load(teacher_path, s.device)
    if info["class_names"] != s.ds.class_names or tuple(info["image_shape"]) != s.ds.image_shape:
        raise InvalidInputError(f"{teacher_path}: the teacher was trained on other classes or image shape "
                                f"({info['class_names']}, {info['image_shape']}) than the dataset's ({s.ds.class_names}, "
                                f"{list(s.ds.image_shape)})")
    return teacher.to(memory_format=memory_format(s.device, channels_last)), info


def setup(dataset_dir: Path, prepared_dir: Path, cfg: TrainConfig, augment_cfg: AugmentConfig) -> Setup:
    device = select_device(cfg.device)
    dist_info = init_distributed(device.type)
    if device.type == "cuda" and dist_info.world_size > 1:
        device = torch.device("cuda", dist_info.rank % torch.cuda.device_count())
    ds = dataset.load(dataset_dir)
    idx = np.load(Path(prepared_dir) / "train_indices.npy")
    train, val = ds.splits["train"], ds.splits["val"]
    images, masks = train.images[idx], train.targets["masks"][idx]
    weights = json.loads((Path(prepared_dir) / "loss.json").read_text())["pixel_weights"]
    mean, std = channel_stats(images)
    parts = (augment_cfg.model_dump(), ds.class_names, weights, mean, std, dist_info.world_size)
    return Setup(
        device, dist_info, ds, (_images_to(images, device), _masks_to(masks, device)),
        (_images_to(val.images, device), _masks_to(val.targets["masks"], device)),
        PixelLoss(weights).to(device), MaskAugment.from_config(augment_cfg), mean, std, parts,
        (images, masks, val.targets["masks"]), weights,
    )  # fmt: skip


def run_train(dataset_dir: Path, prepared_dir: Path, cfg: TrainConfig, augment_cfg: AugmentConfig, model_path: Path,
              reports_dir: Path, checkpoint: Path, on_epoch: EpochCallback | None = None,
              mlflow_cfg: MlflowConfig = MlflowConfig(), data_root: str | None = None) -> dict:
    s = setup(dataset_dir, prepared_dir, cfg, augment_cfg)
    start = starting_point.load(cfg, mlflow_cfg, data_root)
    digest = fingerprint("teacher", cfg.model_dump(), *s.digest_parts, *starting_point.identity(start), arrays=s.arrays)
    hard = s.hard
    model, state = s.fit(cfg.model, cfg, lambda logits, masks, _x: hard(logits, masks), checkpoint, digest, "train",
                         on_epoch, init=start)
    n = len(s.arrays[0])
    metrics = {
        "model": cfg.model,
        "device": str(s.device),
        "world_size": s.dist_info.world_size,
        "epochs_run": state.epoch, "steps_run": state.steps,
        "best_epoch": state.best_epoch,
        "best_val_miou": state.best_acc,
        "prior_correction": s.prior_strength,
        "train_images": int(n),
        "parameters": count_parameters(model),
        **run_seconds(state.history, n),
        "init": s.init,
    }
    if s.dist_info.is_main:
        history = [measured.pure(row) for row in state.history]
        segmenter.save(model_path, model.cpu(), cfg.model, s.ds.class_names, s.ds.image_shape, history=history,
                       **s.ds.model_record())
        write_history(history, reports_dir)
        measured.write_reports(reports_dir, metrics, HEADLINE)
        checkpoint.unlink(missing_ok=True)
    return metrics
