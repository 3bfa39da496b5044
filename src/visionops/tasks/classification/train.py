"""Stage `train`: fit the teacher on the prepared train split, early-stopped on val.

Writes the model (network + preprocessing + class names + served rule: the test-time augmentation
`train.tta` that selected it, and the temperature fitted on val) to `model_path`, and to `reports_dir`:
metrics.json (the DVC metrics: `HEADLINE`), details.json (every figure but the timings), history.csv
(per-epoch curves for DVC plots). Launch under
`torchrun --nproc_per_node N` for multi-GPU (or multi-process CPU) data parallelism.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from visionops import measured
from visionops.config import AugmentConfig, MlflowConfig, TrainConfig
from visionops.data import dataset
from visionops.evaluation import calibration
from visionops.models import count_parameters
from visionops.tasks.classification import classifier, frozen_front
from visionops.tasks.classification.augment import BatchAugment
from visionops.tasks.classification.losses import ClassificationLoss
from visionops.tasks.classification.objective import train_correct, val_scorer
from visionops.training import starting_point
from visionops.training.device import select_device, to_device
from visionops.training.outputs import fingerprint, run_seconds, write_history
from visionops.training.trainer import EpochCallback, fit, init_distributed

HEADLINE = ("best_val_acc",)  # what `dvc metrics show` shows of this stage


def load_train_data(dataset_dir: Path, prepared_dir: Path) -> tuple[dataset.Dataset, np.ndarray, np.ndarray, dict]:
    """The dataset, the prepared training images and labels (resampled, plus offline copies) and loss options."""
    ds = dataset.load(dataset_dir)
    idx = np.load(prepared_dir / "train_indices.npy")
    split = ds.splits["train"]
    images, labels = split.images[idx], split.labels[idx]
    offline = prepared_dir / "offline"
    if offline.exists():
        images = np.concatenate([images, np.load(offline / "images.npy")])
        labels = np.concatenate([labels, np.load(offline / "labels.npy")])
    loss = json.loads((prepared_dir / "loss.json").read_text())
    return ds, images, labels, loss


def recorded_augment(prepared_dir: Path) -> AugmentConfig:
    """The augmentation policy `prepare` validated and recorded (training applies exactly this)."""
    policy = json.loads((prepared_dir / "policy.json").read_text())
    return AugmentConfig.model_validate(policy["augment"])


def set_served_rule(model: classifier.Classifier, tta: str, val: dataset.Split, device: torch.device, batch_size: int) -> None:
    """Store the served rule on `model`: the test-time augmentation `tta` (what selection scored val
    with) and the temperature that minimises the NLL of its val logits (1 when there is no val)."""
    model.tta, model.temperature = tta, 1.0
    logits = classifier.predict_logits(model, val.images, device, batch_size, calibrated=False)
    model.temperature = calibration.fit_temperature(logits, val.labels)


def privacy_metrics(privacy: dict | None) -> dict:
    """The DP-SGD run's figures for the reports (none without train.privacy)."""
    if not privacy:
        return {}
    return {"dp_epsilon": privacy["epsilon"], "dp_delta": privacy["delta"], "dp_noise_multiplier": privacy["noise_multiplier"],
            "dp_steps": privacy["steps"], "dp_group_norm_layers": len(privacy["group_norm"])}


def run_train(
    dataset_dir: Path,
    prepared_dir: Path,
    cfg: TrainConfig,
    augment_cfg: AugmentConfig,
    model_path: Path,
    reports_dir: Path,
    checkpoint: Path,
    on_epoch: EpochCallback | None = None,
    mlflow_cfg: MlflowConfig = MlflowConfig(),
    data_root: str | None = None,
) -> dict:
    device = select_device(cfg.device)
    dist_info = init_distributed(device.type)
    if device.type == "cuda" and dist_info.world_size > 1:
        device = torch.device("cuda", dist_info.rank % torch.cuda.device_count())
    ds, images, labels, loss_opts = load_train_data(dataset_dir, prepared_dir)
    start = starting_point.load(cfg, mlflow_cfg, data_root)
    mean, std = starting_point.normalisation(start, ds.image_shape[2]) or classifier.normalisation(images, cfg.privacy.enabled)
    torch.manual_seed(cfg.seed)
    model = classifier.build(cfg.model, ds.class_names, ds.image_shape, mean, std)
    init = starting_point.start_network(model.net, cfg.model, "classification", ds.class_names, ds.image_shape, start)
    criterion_fn = ClassificationLoss(
        cfg.label_smoothing, loss_opts["class_weights"], loss_opts["class_priors"], cfg.logit_adjust_tau
    ).to(device)
    augment = BatchAugment.from_config(augment_cfg, num_classes=len(ds.class_names))
    val = ds.splits["val"]
    digest = fingerprint(cfg.model_dump(), augment_cfg.model_dump(), ds.class_names, dist_info.world_size,
                         *starting_point.identity(start), arrays=(images, labels, val.labels))
    train_data, val_data = to_device(images, labels, device), to_device(val.images, val.labels, device)
    front = frozen_front.frozen_front(model, augment_cfg, cfg)
    trained = model
    if front is not None:  # the front's features once, not every epoch: the head trains on them
        model = model.to(device)
        train_data = (frozen_front.features(model, train_data[0], cfg.eval_batch_size), train_data[1])
        val_data = (frozen_front.features(model, val_data[0], cfg.eval_batch_size), val_data[1])
        trained = frozen_front.Head(model.net.head)
    trained, state = fit(
        trained,
        train_data,
        val_scorer(val_data, cfg, device),
        cfg,
        augment,
        lambda logits, targets, _x: criterion_fn(logits, targets),
        device,
        checkpoint=checkpoint,
        fingerprint=digest,
        dist_info=dist_info,
        on_epoch=on_epoch,
        train_correct=train_correct,
        transferred=starting_point.transferred(init),
    )
    if front is not None:
        model.net.head = trained.head
    else:
        model = trained
    set_served_rule(model, cfg.tta, val, device, cfg.eval_batch_size)
    metrics = {
        "model": cfg.model,
        "device": str(device),
        "world_size": dist_info.world_size,
        "epochs_run": state.epoch, "steps_run": state.steps,
        "best_epoch": state.best_epoch,
        "best_val_acc": state.best_acc,
        "tta": cfg.tta,
        "temperature": model.temperature,
        "train_images": int(len(labels)),
        "parameters": count_parameters(model),
        **run_seconds(state.history, len(labels)),
        **privacy_metrics(state.privacy),
        "init": init,
    }
    if dist_info.is_main:
        history = [measured.pure(row) for row in state.history]
        classifier.save(model_path, model, cfg.model, ds.class_names, ds.image_shape, history=history,
                        **({"privacy": state.privacy} if state.privacy else {}), **ds.model_record())
        write_history(history, reports_dir)
        measured.write_reports(reports_dir, metrics, HEADLINE)
        checkpoint.unlink(missing_ok=True)
    return metrics
