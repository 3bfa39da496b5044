"""The typed schema of `params.yaml`, validated before any stage does work."""

from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, model_validator

from visionops.errors import VisionopsError
from visionops.model_names import IMAGENET, MIN_IMAGE_SIZE, MODEL_TASKS, NARROWS, NO_CONV, check_model_name, models_for

DEFAULT_PARAMS = Path("params.yaml")
ModelName = Annotated[str, AfterValidator(check_model_name)]  # a name in the model registry


class ParamsError(VisionopsError, ValueError):
    """`params.yaml` is missing, unreadable or invalid; the message names the key."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# The data.source values each task reads (kept here, not in the tasks, so that params are checked torch-free).
SOURCE_TASKS = {
    "digits": ("classification",),
    "cifar10": ("classification",),
    "folder": ("classification",),
    "canvases": ("detection", "segmentation"),
    "coco": ("detection", "segmentation"),
    "voc": ("detection",),
    "yolo": ("detection",),
    "masks": ("segmentation",),
}
ROOTED_SOURCES = ("folder", "coco", "voc", "yolo", "masks")  # the sources that read a folder at data.root
# The annotation file each source reads under data.root (or under root/<split>/) when data.annotations is unset.
DEFAULT_ANNOTATIONS = {"coco": "annotations.json", "voc": "labels.txt", "yolo": "data.yaml", "masks": "classes.txt"}


class CanvasConfig(Section):
    """The embedded detection/segmentation data: scikit-learn's digits composed onto canvases."""

    count: int = Field(1500, ge=10, le=1_000_000)  # canvases generated (holdout, val and test are hashed out of them)
    size: int = Field(64, ge=32, le=1024)  # generated side in pixels (then resized to data.image_size)
    digits: tuple[int, int] = (1, 4)  # fewest and most digits per canvas
    digit_size: tuple[int, int] = (16, 28)  # smallest and largest digit side in pixels

    @model_validator(mode="after")
    def _ranges(self) -> CanvasConfig:
        for key, (lo, hi) in (("digits", self.digits), ("digit_size", self.digit_size)):
            if not 1 <= lo <= hi:
                raise ValueError(f"data.canvases.{key} must be [min, max] with 1 <= min <= max, got [{lo}, {hi}]")
        if self.digit_size[1] > self.size:
            raise ValueError(f"data.canvases.digit_size max {self.digit_size[1]} exceeds data.canvases.size {self.size}")
        return self


class DataConfig(Section):
    """Where images come from and the canonical shape they are stored in."""

    # classification: digits (embedded) | cifar10 (official archive) | folder (ImageFolder tree);
    # detection: canvases (embedded) | coco (COCO json) | voc (Pascal VOC xml) | yolo (YOLO txt + data.yaml);
    # segmentation: canvases (embedded) | coco (polygons or RLE) | masks (PNG index masks beside the images)
    source: Literal["digits", "cifar10", "folder", "canvases", "coco", "voc", "yolo", "masks"] = "digits"
    url: str = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
    md5: str = "c58f30108f718f92721af3b95e74349a"
    root: str | None = None  # folder, coco, voc, yolo, masks: the data folder (layouts in data/sources/<source>.py)
    # coco: the COCO json (default annotations.json); yolo: its data.yaml (default data.yaml); voc: an optional
    # class list, one name a line (default labels.txt); masks: the class list, background first (default
    # classes.txt). Relative to data.root, or to data.root/<split>/ for coco with split folders.
    annotations: str | None = None
    canvases: CanvasConfig = CanvasConfig()  # canvases only
    image_size: int = Field(32, ge=8, le=1024)
    # how a source image becomes the image_size square: squash (stretched) or letterbox (aspect ratio kept, centred,
    # padded black; padded mask pixels ignored). Stored with the dataset and the model, which serves it the same way
    resize: Literal["squash", "letterbox"] = "squash"
    channels: Literal[1, 3] = 1
    val_fraction: float = Field(0.1, ge=0.0, lt=0.5)
    test_fraction: float = Field(0.2, ge=0.0, lt=0.5)
    holdout_fraction: float = Field(0.1, ge=0.0, lt=0.5)  # frozen; used only by promote and monitoring
    seed: int = 0
    # the share of train images whose labels training sees, hash-chosen per image (`data.labelled`); the rest
    # are unlabelled images only `pretrain` uses
    label_fraction: float = Field(1.0, gt=0.0, le=1.0)
    download_retries: int = Field(5, ge=0, le=20)
    cache_dir: str = "data/cache"  # downloaded archives, the canvases written in their standard format, file digests
    # folders outside data.root that a reader may also read (an annotation's path, a symlink, a YOLO folder)
    allowed_roots: list[str] = []
    # a file read before whose bytes changed under the same name: "error" fails download, "warn" goes on
    on_changed_file: Literal["error", "warn"] = "error"
    # sources of files (folder, coco, voc, yolo, masks): images whose perceptual hashes (of the source pixels)
    # differ in at most near_duplicate_max_distance of 64 bits are grouped, transitively, and a group is split as
    # one image (visionops.data.neardup); "none" groups exact copies only. Generated sources are never hashed.
    near_duplicate_hash: Literal["phash", "dhash", "none"] = "phash"
    near_duplicate_max_distance: int = Field(4, ge=0, le=32)

    @model_validator(mode="after")
    def _folder_needs_root(self) -> DataConfig:
        if self.source in ROOTED_SOURCES and not self.root:
            raise ValueError(f"data.root must name the image folder when data.source is {self.source!r}")
        return self

    @property
    def annotation_file(self) -> str | None:
        """data.annotations, or the source's default file name."""
        return self.annotations or DEFAULT_ANNOTATIONS.get(self.source)


class ValidateConfig(Section):
    """Thresholds of the data checks."""

    max_imbalance_ratio: float = Field(10.0, ge=1.0)
    # segmentation: train pixels of the largest class / of the smallest present one, above this is a warning
    max_pixel_imbalance_ratio: float = Field(100.0, ge=1.0)
    pixel_mean_range: tuple[float, float] = (1.0, 254.0)
    min_pixel_std: float = Field(1.0, ge=0.0)
    max_image_size: int = Field(4096, ge=1)
    # images of one near-duplicate group (data.near_duplicate_*) or exact copies whose labels differ: "warn" or
    # "error". Detection: box coordinates may differ by label_conflict_tolerance of the image side; segmentation:
    # that fraction of mask pixels may differ; classification: the class must agree.
    on_label_conflict: Literal["warn", "error"] = "warn"
    label_conflict_tolerance: float = Field(0.02, ge=0.0, lt=1.0)


class BalanceConfig(Section):
    """How `prepare` treats class imbalance."""

    strategy: Literal["none", "oversample", "undersample", "class_weights", "logit_adjust", "repeat_factor"] = "none"
    repeat_threshold: float = Field(0.1, gt=0.0, le=1.0)  # repeat_factor (LVIS): t in r(c) = max(1, sqrt(t / f(c)))
    simulate_imbalance_factor: float = Field(1.0, ge=1.0)
    offline: bool = False
    seed: int = 0
    drop_label_issues: bool = False  # classification: leave out the train images label_issues lists

    @model_validator(mode="after")
    def _offline_needs_oversample(self) -> BalanceConfig:
        if self.offline and self.strategy != "oversample":
            raise ValueError("balance.offline is only valid with balance.strategy 'oversample'")
        return self


class LabelIssuesConfig(Section):
    """Stage `label_issues`: confident learning (cleanlab) on out-of-fold probabilities of the train split."""

    enabled: bool = True  # false: nothing is trained and the report lists no image
    model: ModelName = "lenet"  # the small classifier cross-trained once per fold
    folds: int = Field(5, ge=2, le=20)
    epochs: int = Field(15, ge=1, le=1000)
    batch_size: int = Field(64, ge=1)
    optimizer: Literal["sgd", "adamw"] = "adamw"
    lr: float = Field(0.003, gt=0.0)
    # cleanlab's filter_by: which images count as issues (the report ranks them by self-confidence)
    filter_by: Literal["prune_by_noise_rate", "prune_by_class", "both", "confident_learning", "predicted_neq_given"] = (
        "prune_by_noise_rate")
    gallery_size: int = Field(36, ge=0, le=400)
    seed: int = 0


class AugmentConfig(Section):
    """The augmentation policy; `train` applies it on the fly as batched tensor ops."""

    hflip: bool = False
    rotate_degrees: float = Field(0.0, ge=0.0, le=180.0)
    crop_padding: int = Field(0, ge=0, le=16)
    cutout_size: int = Field(0, ge=0)
    auto: Literal["none", "randaugment", "trivialaugment"] = "none"
    randaugment_num_ops: int = Field(2, ge=1, le=8)
    randaugment_magnitude: int = Field(9, ge=0, le=30)
    mixup_alpha: float = Field(0.0, ge=0.0)
    cutmix_alpha: float = Field(0.0, ge=0.0)
    # detection and segmentation (box- and mask-aware); the defaults are off
    scale_jitter: float = Field(0.0, ge=0.0, lt=1.0)  # zoom by a factor in [1 - s, 1 + s]
    translate: float = Field(0.0, ge=0.0, le=0.5)  # shift by up to this fraction of the side
    brightness: float = Field(0.0, ge=0.0, le=1.0)  # photometric: brightness and contrast factors in [1 - b, 1 + b]
    contrast: float = Field(0.0, ge=0.0, le=1.0)

    def classification_policy(self) -> dict:
        """The settings classification's batched augmentation takes (the box- and mask-aware ones are
        for detection and segmentation; `Params` refuses them for classification)."""
        return self.model_dump(exclude=set(DENSE_AUGMENT))


DENSE_AUGMENT = ("scale_jitter", "translate", "brightness", "contrast")  # augment keys of detection and segmentation
# augment keys of classification only (randaugment_* count only with `auto`)
CLASSIFICATION_AUGMENT = ("rotate_degrees", "crop_padding", "cutout_size", "auto", "mixup_alpha", "cutmix_alpha")


def _speed_switch(value: object) -> object:
    return {True: "cuda", False: "off"}.get(value, value) if isinstance(value, bool) else value


# Where a speed setting applies: "cuda" (true) on CUDA only; "always" on the CPU too (oneDNN's NHWC convolutions
# and bf16 autocast, which pay on CPUs with AVX-512 BF16 or AMX, but crashed oneDNN's backward pass for one
# classifier, so opt-in); "off" (false) nowhere.
SpeedSwitch = Annotated[Literal["cuda", "always", "off"], BeforeValidator(_speed_switch)]


class PrivacyConfig(Section):
    """DP-SGD (Opacus): per-image gradient clipping and Gaussian noise on Poisson-sampled batches, with an (ε, δ)
    budget on the train split. The noise is set so that train.epochs epochs spend `target_epsilon`."""

    enabled: bool = False
    target_epsilon: float = Field(8.0, gt=0.0)
    delta: float | None = Field(None, gt=0.0, lt=1.0)  # None: the largest power of ten <= 1 / (train images)
    max_grad_norm: float = Field(1.0, gt=0.0)  # each image's gradient is clipped to this L2 norm
    accountant: Literal["rdp", "prv"] = "rdp"


REGISTERED_INIT = re.compile(r"models:/(?P<name>[^/@\s]+)(?:@(?P<alias>[A-Za-z0-9_-]+)|/(?P<version>[1-9][0-9]*))")


def check_init(value: str) -> str:
    """`train.init`: scratch, imagenet, pretrain, models:/<name>@<alias>, models:/<name>/<version> or a file's path."""
    if value.startswith("models:/") and not REGISTERED_INIT.fullmatch(value):
        raise ValueError(f"{value!r} is not models:/<name>@<alias> or models:/<name>/<version>")
    if not value.strip():
        raise ValueError("empty; use scratch, imagenet, pretrain, models:/<name>@<alias>, models:/<name>/<version> "
                         "or the path of a visionops model file")
    return value


class TrainConfig(Section):
    """The teacher's training run."""

    model: ModelName = "lenet"
    epochs: int = Field(15, ge=1, le=10_000)
    # None: train `epochs` whole epochs; N: exactly N optimiser steps (the lr schedule spans them) in
    # ceil(N / steps per epoch) epochs, the last one stopping when they are done (for small data sets)
    steps: int | None = Field(None, ge=1, le=10_000_000)
    batch_size: int = Field(128, ge=1)
    optimizer: Literal["sgd", "adamw"] = "sgd"
    lr: float = Field(0.05, gt=0.0)
    momentum: float = Field(0.9, ge=0.0, lt=1.0)
    nesterov: bool = True
    weight_decay: float = Field(5e-4, ge=0.0)
    schedule: Literal["onecycle", "cosine", "triangle", "constant"] = "onecycle"
    norm_lr_scale: float = Field(1.0, gt=0.0)  # lr multiplier for norm layers' scales and shifts (airbench: 64)
    lookahead: bool = False  # EMA-of-weights lookahead over the last 70% of steps (airbench)
    tta: Literal["none", "flip", "flip_translate"] = "none"  # test-time augmentation when scoring val
    label_smoothing: float = Field(0.0, ge=0.0, lt=1.0)
    logit_adjust_tau: float = Field(1.0, ge=0.0)
    early_stopping_patience: int = Field(0, ge=0)  # 0 = off
    # progressive resizing (segmentation, the teacher's run): the first `progressive_epochs` epochs train on
    # smaller images, the side ramping linearly from `progressive_start` x the full side up to it; 1.0 = off
    progressive_start: float = Field(1.0, gt=0.0, le=1.0)
    progressive_epochs: int = Field(0, ge=0)
    seed: int = 0
    device: Literal["auto", "cpu", "cuda", "mps"] = "auto"
    amp: SpeedSwitch = "cuda"  # bf16 autocast (fp16 on CUDA without bf16): on CUDA, on every device, or off
    channels_last: SpeedSwitch = "cuda"  # NHWC memory format: on CUDA, on every device, or off
    compile: bool = False  # torch.compile on CUDA
    eval_batch_size: int = Field(1024, ge=1)
    # torch's intra-op CPU threads in train, evaluate and distill: "auto" keeps torch's default (the cores
    # it sees, or OMP_NUM_THREADS). Lower it to 1 on a machine shared with other busy processes.
    threads: Literal["auto"] | Annotated[int, Field(ge=1, le=1024)] = "auto"
    privacy: PrivacyConfig = PrivacyConfig()
    # the starting weights: scratch (random) | imagenet (torchvision's, models.IMAGENET) | pretrain (the encoder
    # in models/backbone.pt) | models:/<name>@<alias> or models:/<name>/<version> (this project's registry) |
    # the path of a visionops model file inside the project or data.root (README "Starting points")
    init: Annotated[str, AfterValidator(check_init)] = "scratch"
    freeze_epochs: int = Field(0, ge=0)  # the first epochs train only the layers the starting point did not give
    backbone_lr_scale: float = Field(1.0, gt=0.0, le=1.0)  # lr multiplier of the layers the starting point gave

    @model_validator(mode="after")
    def _fine_tuning_needs_a_start(self) -> TrainConfig:
        if self.init == "scratch" and (self.freeze_epochs or self.backbone_lr_scale != 1.0):
            key = "freeze_epochs" if self.freeze_epochs else "backbone_lr_scale"
            raise ValueError(f"train.{key} applies to the layers a starting point gives, and train.init is scratch")
        if self.privacy.enabled and self.freeze_epochs:
            raise ValueError("train.freeze_epochs cannot be used with train.privacy.enabled (Opacus clips the "
                             "per-image gradients of every trainable layer); set it to 0")
        return self

    @model_validator(mode="after")
    def _dp_sgd_settings(self) -> TrainConfig:
        if self.privacy.enabled:
            if self.amp == "always":
                raise ValueError("train.amp: 'always' (bf16 autocast) cannot be used with train.privacy.enabled "
                                 "(Opacus clips per-image gradients in float32); set train.amp to false")
            if self.compile:
                raise ValueError("train.compile cannot be used with train.privacy.enabled (Opacus's per-image "
                                 "gradient hooks); set train.compile to false")
            if self.steps is not None:
                raise ValueError("train.steps cannot be used with train.privacy.enabled (the noise is set for whole "
                                 "epochs of Poisson-sampled batches); set train.steps to null and use train.epochs")
        return self

    @model_validator(mode="after")
    def _last_epochs_at_full_size(self) -> TrainConfig:
        if self.progressive_start < 1 and self.steps is None and self.progressive_epochs >= self.epochs:
            raise ValueError(f"train.progressive_epochs ({self.progressive_epochs}) must be below train.epochs "
                             f"({self.epochs}): the last epochs train at the full size")
        return self


def apply_threads(threads: str | int) -> int:
    """Set torch's intra-op thread count (`train.threads`); returns the count in effect."""
    import torch

    if threads != "auto":
        torch.set_num_threads(int(threads))
    return torch.get_num_threads()


class PretrainConfig(Section):
    """Stage `pretrain`: SimSiam (Chen & He, CVPR 2021) self-supervised training of train.model's encoder on the
    train images without labels (and `unlabelled_root`'s); `train.init: pretrain` starts from it."""

    enabled: bool = False  # false: write a stub models/backbone.pt saying so, and train nothing
    epochs: int = Field(20, ge=1, le=10_000)
    batch_size: int = Field(256, ge=2)
    optimizer: Literal["sgd", "adamw"] = "sgd"
    lr: float = Field(0.03, gt=0.0)  # SimSiam on CIFAR-10: 0.03 x batch / 256 (SGD, momentum 0.9, cosine)
    momentum: float = Field(0.9, ge=0.0, lt=1.0)
    weight_decay: float = Field(5e-4, ge=0.0)
    projection_dim: int = Field(512, ge=8)  # the projector's hidden and output width (the paper: 2048 on ImageNet)
    prediction_dim: int = Field(128, ge=4)  # the predictor's bottleneck (the paper: a quarter of projection_dim)
    crop_min_scale: float = Field(0.2, gt=0.0, le=1.0)  # random resized crop keeps [crop_min_scale, 1] of the area
    hflip: bool = True
    jitter: float = Field(0.4, ge=0.0, le=1.0)  # brightness, contrast and saturation factors in [1 - j, 1 + j]
    jitter_prob: float = Field(0.8, ge=0.0, le=1.0)
    grey_prob: float = Field(0.2, ge=0.0, le=1.0)  # RGB only
    blur_prob: float = Field(0.0, ge=0.0, le=1.0)  # Gaussian blur, sigma in [0.1, 2] x image_size / 224 (ImageNet: 0.5)
    knn_k: int = Field(20, ge=1)  # kNN probe on val (classification): cosine neighbours among the labelled train images
    seed: int = 0
    unlabelled_root: str | None = None  # a folder of more images (any depth) inside data.root or data.allowed_roots


class EvaluateConfig(Section):
    """Test-split evaluation of the trained teacher."""

    top_k: int = Field(5, ge=1)
    calibration_bins: int = Field(15, ge=2, le=100)
    gradcam_samples: int = Field(8, ge=0, le=64)
    gallery_size: int = Field(36, ge=0, le=400)
    latency_batch_size: int = Field(64, ge=1)


class DistillConfig(Section):
    """Hinton knowledge distillation of a small student from the trained teacher."""

    student: ModelName = "slim_resnet"
    temperature: float = Field(4.0, gt=0.0)
    alpha: float = Field(0.7, ge=0.0, le=1.0)  # weight of the KD term; 1 - alpha on the hard labels
    epochs: int = Field(15, ge=1, le=10_000)
    steps: int | None = Field(None, ge=1, le=10_000_000)  # None: `epochs`; N: exactly N optimiser steps (as train.steps)
    lr: float = Field(0.05, gt=0.0)
    baseline: bool = True  # also train the student alone, to show what distillation gained
    # scratch: the student starts from random weights; teacher: from the teacher's strongest channels (the same
    # network at a narrower width, model_names.NARROWS), and so does the student trained alone
    init: Literal["scratch", "teacher"] = "scratch"
    onnx_atol: float = Field(1e-4, gt=0.0)
    onnx_rtol: float = Field(1e-3, ge=0.0)  # ONNX parity: |onnx - torch| <= atol + rtol * |torch|
    quantize: bool = True  # static int8 quantization (ONNX Runtime, QDQ) of the student, with accuracy and speed


class SegmentationConfig(Section):
    """Segmentation's own settings (used when task is segmentation)."""

    overlay_images: int = Field(6, ge=0, le=64)  # test images evaluate draws with true and predicted masks


class DetectionConfig(Section):
    """Detection's prediction rule (stored in the model file, so serving applies the same one)."""

    score_threshold: float = Field(0.3, ge=0.0, le=1.0)  # served detections score at least this
    iou_threshold: float = Field(0.5, gt=0.0, le=1.0)  # batched NMS: same-class boxes overlapping more are dropped
    max_detections: int = Field(20, ge=1, le=1000)  # per image, after NMS
    class_agnostic_nms: bool = False  # NMS across classes (one box per place): for objects that rarely overlap
    map_score_threshold: float = Field(0.01, ge=0.0, le=1.0)  # evaluate's mAP ranks every detection above this


class MlflowConfig(Section):
    """Experiment tracking and the model registry."""

    enabled: bool = True
    experiment: str = "visionops"
    tracking_uri: str | None = None  # default sqlite:///<project>/mlflow.db; MLFLOW_TRACKING_URI overrides
    teacher_model_name: str = "visionops-classifier"
    student_model_name: str = "visionops-student"
    backbone_model_name: str = "visionops-backbone"  # stage pretrain's encoder (an artifact, not a served model)


Fraction = Annotated[float, Field(ge=0.0, le=1.0)]


class PromoteConfig(Section):
    """Gates a challenger must pass to become champion, judged on the frozen holdout (data/holdout).

    `auto` floors fit the data: what a predictor that learnt nothing scores on the same holdout (the task's
    `trivial_scores`: the most frequent class, no box, every pixel the most frequent class) plus `auto_margin`
    of the gap from there to 1."""

    min_score: Literal["auto"] | Fraction = "auto"  # the task's headline metric: accuracy, mAP@.5, mIoU
    min_gain: float = Field(0.0, ge=-1.0, le=1.0)  # gain in the task's per-image measure (accuracy, F1, mIoU), same images
    significance: float = Field(0.05, gt=0.0, le=1.0)  # the task's one-sided paired test's p-value needed; 1.0 = no test
    min_class_score: Literal["auto"] | Fraction = "auto"  # each class's recall, AP@.5 or IoU
    auto_margin: float = Field(0.25, ge=0.0, lt=1.0)  # auto = trivial + auto_margin x (1 - trivial)
    max_ece: float = Field(0.1, ge=0.0, le=1.0)  # classification only (the others serve no probabilities)
    max_latency_ratio: float = Field(1.5, gt=0.0)  # challenger / champion time per batch, measured in turns
    max_membership_auc: float | None = Field(0.6, ge=0.5, le=1.0)  # the stronger membership attack's AUC; None = off
    max_epsilon: float | None = Field(None, gt=0.0)  # the DP-SGD ε the challenger spent; None = off (a non-private model: inf)


class MonitorConfig(Section):
    """The production loop: the served models' inference log, drift windows against the registered reference,
    the retraining trigger; and the monitoring flow's floor on the champion's score on newly labelled data."""

    min_score: float = Field(0.9, ge=0.0, le=1.0)
    log_uri: str | None = "logs/inference"  # a local directory (relative: to the serving process's working dir) or s3://bucket/prefix; None = off
    embedding_dim: int = Field(32, ge=2, le=256)  # the logged embedding: the model's pooled features projected (PCA of the validation split)
    flush_rows: int = Field(256, ge=1)  # a log file is written every flush_rows rows or flush_seconds: a kill -9 loses at most that
    flush_seconds: float = Field(5.0, gt=0.0)
    queue_rows: int = Field(100_000, ge=1)  # rows waiting for the sink at most; beyond, rows are dropped and counted (never the answer)
    sample_images: float = Field(0.0, ge=0.0, le=1.0)  # the fraction of served images kept (raw bytes) for labelling; 0 = none
    sample_max_images: int = Field(1000, ge=0)  # kept images at most (the oldest are deleted first)
    sample_retention_days: float = Field(30.0, gt=0.0)  # kept images older than this are deleted
    window_rows: int = Field(500, ge=10)  # a drift window: the newest rows since the previous window, at most this many
    min_window_rows: int = Field(100, ge=10)  # fewer new rows: no window is judged
    alpha: float = Field(0.01, gt=0.0, lt=1.0)  # a window drifts when a test's p-value is below alpha / number of tests (Bonferroni)
    max_error_rate: float = Field(0.05, ge=0.0, le=1.0)  # data quality: rows refused (undecodable, too large) in a window at most
    windows_to_trigger: int = Field(3, ge=1)  # consecutive drifted windows that start the `training` deployment


class ScheduleConfig(Section):
    """Scheduled retraining (a Prefect deployment)."""

    cron: str = "0 2 * * *"  # nightly at 02:00
    monitor_cron: str = "0 6 * * *"  # the monitoring flow, daily after retraining
    drift_cron: str = "15 * * * *"  # the drift flow: one window of the inference log, hourly
    timezone: str = "UTC"


TaskName = Literal["classification", "detection", "segmentation"]  # keep equal to visionops.tasks.TASKS


class Params(Section):
    """Every setting of the pipeline, one section per stage, and the task they serve."""

    task: TaskName = "classification"
    data: DataConfig = DataConfig()
    validate_: ValidateConfig = Field(ValidateConfig(), alias="validate")
    label_issues: LabelIssuesConfig = LabelIssuesConfig()
    balance: BalanceConfig = BalanceConfig()
    augment: AugmentConfig = AugmentConfig()
    pretrain: PretrainConfig = PretrainConfig()
    train: TrainConfig = TrainConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    distill: DistillConfig = DistillConfig()
    detection: DetectionConfig = DetectionConfig()
    segmentation: SegmentationConfig = SegmentationConfig()
    mlflow: MlflowConfig = MlflowConfig()
    promote: PromoteConfig = PromoteConfig()
    monitor: MonitorConfig = MonitorConfig()
    schedule: ScheduleConfig = ScheduleConfig()

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    @model_validator(mode="after")
    def _source_fits_the_task(self) -> Params:
        if self.task not in SOURCE_TASKS[self.data.source]:
            readable = [s for s, tasks in SOURCE_TASKS.items() if self.task in tasks]
            raise ValueError(f"data.source: {self.data.source!r} cannot be read for task {self.task!r}; "
                             f"{self.task} reads: {', '.join(readable)}")
        return self

    @model_validator(mode="after")
    def _label_issues_fit_the_task(self) -> Params:
        if self.balance.drop_label_issues and not (self.task == "classification" and self.label_issues.enabled):
            raise ValueError("balance.drop_label_issues needs task classification and label_issues.enabled "
                             f"(task is {self.task!r}, label_issues.enabled is {self.label_issues.enabled})")
        return self

    @model_validator(mode="after")
    def _augment_fits_the_task(self) -> Params:
        if self.task == "classification":
            used = [k for k in DENSE_AUGMENT if getattr(self.augment, k)]
            if used:
                raise ValueError(f"augment.{used[0]} applies to detection and segmentation only (task is classification)")
        else:
            used = [k for k in CLASSIFICATION_AUGMENT if getattr(self.augment, k) not in (0, 0.0, "none")]
            if used:
                raise ValueError(f"augment.{used[0]} applies to classification only (task is {self.task}); "
                                 f"detection and segmentation take {', '.join(DENSE_AUGMENT)} and hflip")
        return self

    @model_validator(mode="after")
    def _progressive_resizing_fits_the_task(self) -> Params:
        if self.task != "segmentation" and self.train.progressive_start < 1 and self.train.progressive_epochs > 0:
            raise ValueError(f"train.progressive_start applies to segmentation only (task is {self.task}); set it to 1.0")
        return self

    @model_validator(mode="after")
    def _privacy_fits_the_task_and_data(self) -> Params:
        if not self.train.privacy.enabled:
            return self
        if self.distill.steps is not None:
            raise ValueError("distill.steps cannot be used with train.privacy.enabled (the noise is set for whole "
                             "epochs of Poisson-sampled batches); set distill.steps to null and use distill.epochs")
        if self.task != "classification":
            raise ValueError(f"train.privacy applies to classification only (task is {self.task}): {self.task}'s "
                             "losses are not checked to be a mean of per-image terms, which DP-SGD's per-image "
                             "clipping needs")
        mixing = [k for k in ("mixup_alpha", "cutmix_alpha") if getattr(self.augment, k) > 0]
        if mixing:
            raise ValueError(f"augment.{mixing[0]} mixes images across the batch, so one image's gradient depends on "
                             "others and DP-SGD's per-image clipping no longer bounds it; set it to 0 with "
                             "train.privacy.enabled")
        if self.balance.strategy != "none":
            raise ValueError(f"balance.strategy {self.balance.strategy!r} repeats, drops or weights images by their "
                             "class counts, which DP-SGD's per-image guarantee does not cover; use 'none' with "
                             "train.privacy.enabled")
        return self

    @model_validator(mode="after")
    def _student_can_start_from_the_teacher(self) -> Params:
        if self.distill.init == "teacher" and NARROWS.get(self.distill.student) != self.train.model:
            pairs = ", ".join(f"{t} -> {s}" for s, t in NARROWS.items())
            raise ValueError(f"distill.init: 'teacher' needs a student that is the teacher's network at a narrower "
                             f"width; {self.train.model} -> {self.distill.student} is not one (pairs: {pairs}); "
                             "use 'scratch'")
        return self

    @model_validator(mode="after")
    def _models_fit_the_task_and_images(self) -> Params:
        if self.train.model in NO_CONV and self.evaluate.gradcam_samples > 0:
            raise ValueError(f"evaluate.gradcam_samples: {self.train.model} has no convolution for Grad-CAM to explain; set it to 0")
        if self.distill.student in NO_CONV:
            raise ValueError(f"distill.student: {self.distill.student} cannot be exported to ONNX (its scattering transform "
                             "uses complex tensors), which distill does; pick another student")
        keys = [("train.model", self.train.model), ("distill.student", self.distill.student)]
        if self.task == "classification" and self.label_issues.enabled:
            keys.append(("label_issues.model", self.label_issues.model))
        if self.train.init == "imagenet" and self.train.model not in IMAGENET:
            raise ValueError(f"train.init: imagenet: torchvision has no ImageNet weights for {self.train.model}; models "
                             f"with them: {', '.join(IMAGENET)}")
        for key, name in keys:
            if MODEL_TASKS[name] != self.task:
                raise ValueError(f"{key}: {name} is a {MODEL_TASKS[name]} model but task is {self.task!r}; "
                                 f"{self.task} models: {', '.join(models_for(self.task))}")
            need = MIN_IMAGE_SIZE.get(name, 0)
            if self.data.image_size < need:
                raise ValueError(f"{key}: {name} needs data.image_size >= {need}, got {self.data.image_size}")
        return self


def _known_keys(model: type[BaseModel], loc: tuple) -> list[str]:
    """The keys allowed at `loc` (the parent of an offending key)."""
    for part in loc:
        field = next(
            (f for name, f in model.model_fields.items() if (f.alias or name) == part), None
        )
        if field is None or not (isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)):
            return []
        model = field.annotation
    return [f.alias or name for name, f in model.model_fields.items()]


def _describe(err: dict) -> str:
    loc = tuple(p for p in err["loc"] if isinstance(p, str))
    key = ".".join(loc) or "(top level)"
    if err["type"] == "extra_forbidden":
        allowed = _known_keys(Params, loc[:-1])
        close = difflib.get_close_matches(loc[-1], allowed, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        return f"{key}: unknown key{hint}; allowed: {', '.join(allowed)}"
    if not loc and err["type"] == "value_error":  # a rule across sections names its keys itself
        return err["msg"].removeprefix("Value error, ")
    got = err.get("input")
    shown = "" if isinstance(got, dict) else f" (got {got!r})"
    return f"{key}: {err['msg'].removeprefix('Value error, ')}{shown}"


def parse_params(raw: object, origin: str = "params") -> Params:
    """Validate a params mapping, raising ParamsError that names each bad key."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ParamsError(f"{origin}: top level must be a mapping of sections, got {type(raw).__name__}")
    try:
        return Params.model_validate(raw)
    except ValidationError as exc:
        lines = "\n".join(f"  - {_describe(e)}" for e in exc.errors())
        raise ParamsError(f"{origin} is invalid:\n{lines}") from None


def load_params(path: Path | str = DEFAULT_PARAMS) -> Params:
    """Read and validate `params.yaml`."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ParamsError(f"{path}: no such file (run from the project root or pass --params)") from None
    except yaml.YAMLError as exc:
        raise ParamsError(f"{path}: not valid YAML: {exc}") from None
    return parse_params(raw, origin=str(path))
