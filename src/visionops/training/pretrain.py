"""Stage `pretrain`: SimSiam self-supervised pretraining of train.model's encoder (Chen & He, "Exploring Simple
Siamese Representation Learning", CVPR 2021), for every task.

Two strong views (`training.views`) of every train image, labelled or not (`data.label_fraction`), and of every
image under `pretrain.unlabelled_root` go through the encoder (`models.encoders`), global average pooling and a
projector; a predictor maps each view's projection to the other's, whose gradient is stopped (lightly's
SimSiamProjectionHead, SimSiamPredictionHead and NegativeCosineSimilarity; each view is its own batch, so batch
norm sees one view at a time as in the paper). Each epoch's row holds the loss and `output_std`: the
per-dimension std of the l2-normalised projections times sqrt(dim), about 1 while they spread over the sphere
and 0 when they collapse to a point (the paper's fig. 2 plots the std without the sqrt(dim)). Every epoch ends
with a checkpoint, which a rerun resumes. At the end, for classification, a cosine kNN probe on val (k =
`pretrain.knn_k`, the labelled train images as memory, votes weighted exp(sim / 0.1) as in Wu et al. 2018)
scores the pretrained encoder and the same encoder at its random initialisation (its batch-norm statistics
taken from the images, as training gives the pretrained one): whether pretraining helped.

`out_path` (models/backbone.pt, written by `model_file.save`): {"task": "backbone", "enabled": True, "arch",
"encoder" (`encoders.to_canonical` tensors, batch-norm statistics included), "mean" and "std" (the per-channel
normalisation the encoder was trained behind), "image_shape", "history", "settings"}. Disabled, it holds only
{"task": "backbone", "enabled": False}. `reports_dir`/details.json holds the result (measured.json its timings).
"""

from __future__ import annotations

import copy
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from visionops import atomic, measured
from visionops.config import Params, PrivacyConfig
from visionops.data import dataset
from visionops.data.labelled import labelled_rows
from visionops.errors import InvalidInputError
from visionops.models import count_parameters, create_model, encoders, model_file
from visionops.tasks.classification.classifier import channel_stats
from visionops.training.device import autocast, memory_format, select_device
from visionops.training.outputs import fingerprint, run_seconds
from visionops.training.trainer import TrainState, _load_checkpoint, _optimizer, _save_checkpoint, _scheduler
from visionops.training.views import StrongViews

TASK = "backbone"  # the model file's "task": what `train.init: pretrain` reads
KNN_TEMPERATURE = 0.1


class SimSiam(nn.Module):
    """Normalised images -> (projection z, prediction p); `encoder` is the network's own (shared) modules."""

    def __init__(self, encoder: nn.Sequential, mean: list[float], std: list[float], features: int, projection: int,
                 prediction: int):
        from lightly.models.modules import SimSiamPredictionHead, SimSiamProjectionHead

        super().__init__()
        self.encoder = encoder
        self.projector = SimSiamProjectionHead(features, projection, projection)
        self.predictor = SimSiamPredictionHead(projection, prediction, projection)
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def features(self, x: Tensor) -> Tensor:
        """Pooled encoder features of float images in [0, 1]."""
        return self.encoder((x - self.mean) / self.std).mean((2, 3))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        z = self.projector(self.features(x))
        return z, self.predictor(z)


def output_std(z: Tensor) -> Tensor:
    """The per-dimension std of the l2-normalised rows of `z`, times sqrt(dim): ~1 spread, 0 collapsed."""
    return F.normalize(z.float(), dim=1).std(0).mean() * math.sqrt(z.shape[1])


def unlabelled_images(params: Params) -> np.ndarray:
    """The images under pretrain.unlabelled_root (absolute, or relative to data.root), as the dataset's uint8
    NHWC; every file is checked to lie inside data.root or data.allowed_roots (`data.roots`)."""
    from visionops.data.images import IMAGE_SUFFIXES, decode_file
    from visionops.data.roots import files_inside

    data, folder = params.data, Path(params.pretrain.unlabelled_root).expanduser()
    roots = tuple(Path(p).expanduser().resolve() for p in (data.root, *data.allowed_roots) if p)
    if not roots:
        raise InvalidInputError(f"pretrain.unlabelled_root: {folder} cannot be read: data.source {data.source!r} has no "
                                "data.root, and data.allowed_roots is empty (list the folder there)")
    if not folder.is_absolute() and data.root:
        folder = Path(data.root).expanduser() / folder
    if not folder.is_dir():
        raise InvalidInputError(f"pretrain.unlabelled_root: {folder} is not a folder")
    out = []
    for path, resolved in files_inside(roots, folder, "pretrain.unlabelled_root"):
        if path.suffix.lower() in IMAGE_SUFFIXES:
            try:
                out.append(decode_file(resolved, data.image_size, data.channels)[0])
            except Exception as exc:  # noqa: BLE001 - one line naming the file
                raise InvalidInputError(f"pretrain.unlabelled_root: {path} cannot be read: {exc}") from exc
    if not out:
        raise InvalidInputError(f"pretrain.unlabelled_root: {folder} holds no image ({', '.join(sorted(IMAGE_SUFFIXES))})")
    return np.stack(out)


@torch.no_grad()
def embed(model: SimSiam, images: np.ndarray, device: torch.device, batch_size: int) -> Tensor:
    """l2-normalised pooled encoder features of uint8 NHWC `images` (eval mode)."""
    model.eval()
    out = []
    for start in range(0, len(images), batch_size):
        x = torch.from_numpy(np.array(images[start : start + batch_size])).to(device).permute(0, 3, 1, 2)
        out.append(F.normalize(model.features(x.float() / 255).float(), dim=1).cpu())
    return torch.cat(out)


@torch.no_grad()
def recalibrate(model: SimSiam, images: np.ndarray, device: torch.device, batch_size: int) -> SimSiam:
    """`model` with its batch-norm statistics averaged over `images` (train mode, no gradient): a random
    encoder's defaults (mean 0, variance 1) would handicap it in the probe for no reason of its weights."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # a cumulative average
    model.train()
    for start in range(0, len(images), batch_size):
        x = torch.from_numpy(np.array(images[start : start + batch_size])).to(device).permute(0, 3, 1, 2)
        if len(x) > 1:
            model.features(x.float() / 255)
    return model


def knn_accuracy(bank: Tensor, bank_labels: Tensor, queries: Tensor, labels: Tensor, k: int, classes: int) -> float:
    """Accuracy of a weighted cosine kNN (Wu et al. 2018): each of the k nearest rows of `bank` votes
    exp(similarity / 0.1) for its label."""
    right = 0
    for start in range(0, len(queries), 1024):
        sims, idx = (queries[start : start + 1024] @ bank.T).topk(min(k, len(bank)), dim=1)
        votes = torch.zeros(len(idx), classes).scatter_add_(1, bank_labels[idx], (sims / KNN_TEMPERATURE).exp())
        right += int((votes.argmax(1) == labels[start : start + 1024]).sum())
    return right / max(len(queries), 1)


def _loop_settings(params: Params):
    """The train settings the shared optimiser and schedule read, set from `pretrain` (SGD without Nesterov,
    cosine decay, as the paper)."""
    p = params.pretrain
    return params.train.model_copy(update=dict(
        epochs=p.epochs, batch_size=p.batch_size, optimizer=p.optimizer, lr=p.lr, momentum=p.momentum, nesterov=False,
        weight_decay=p.weight_decay, schedule="cosine", norm_lr_scale=1.0, seed=p.seed, privacy=PrivacyConfig()))


def run_pretrain(params: Params, dataset_dir: Path, out_path: Path, reports_dir: Path, checkpoint: Path,
                 on_epoch=None) -> dict:
    """Pretrain (or, with pretrain.enabled false, write the stub) and return the result."""
    cfg = params.pretrain
    if not cfg.enabled:
        model_file.save(out_path, {"task": TASK, "enabled": False})
        result = {"enabled": False, "note": "pretrain.enabled is false: nothing trained"}
        atomic.write_json(Path(reports_dir) / "details.json", result)
        return result
    arch = params.train.model
    encoders.encoder_prefixes(arch)  # a model without an encoder is named before any work
    ds = dataset.load(dataset_dir)
    train = ds.splits["train"]
    extra = unlabelled_images(params) if cfg.unlabelled_root else np.empty((0, *ds.image_shape), np.uint8)
    images = np.concatenate([np.asarray(train.images), extra])
    if len(images) < 2:
        raise InvalidInputError(f"pretrain: {len(images)} image(s) to pretrain on; SimSiam's batch norm needs two")
    device = select_device(params.train.device)
    loop = _loop_settings(params)
    fmt = memory_format(device, loop.channels_last)
    mean, std = channel_stats(images)
    h, _, c = ds.image_shape
    torch.manual_seed(cfg.seed)
    net = create_model(arch, in_channels=c, num_classes=len(ds.class_names), image_size=h)
    backbone = encoders.encoder(net, arch)
    features = backbone.eval()(torch.zeros(2, c, h, h)).shape[1]
    model = SimSiam(backbone, mean, std, features, cfg.projection_dim, cfg.prediction_dim)
    initial = copy.deepcopy(model)  # the random initialisation the kNN probe compares against
    model = model.to(device, memory_format=fmt)
    batch = min(cfg.batch_size, len(images))
    steps = len(images) // batch  # whole batches only: batch norm on a last batch of one image fails
    opt = _optimizer(model, loop)
    sched = _scheduler(opt, loop, steps)
    gen = torch.Generator(device=device if device.type == "cuda" else "cpu").manual_seed(cfg.seed)
    digest = fingerprint(cfg.model_dump(), arch, loop.amp, arrays=(images,))
    state = _load_checkpoint(checkpoint, digest, model, opt, sched, gen) if checkpoint else TrainState()
    from lightly.loss import NegativeCosineSimilarity

    criterion = NegativeCosineSimilarity()
    views = StrongViews(cfg)
    x_all = torch.from_numpy(images).to(device).permute(0, 3, 1, 2)  # uint8 NCHW, on the device once
    bar = tqdm(total=cfg.epochs, initial=state.epoch, desc="pretrain", unit="epoch", disable=None, file=sys.stderr)
    while state.epoch < cfg.epochs:
        t0 = time.perf_counter()
        model.train()
        perm = torch.randperm(len(images), generator=gen, device=gen.device).to(device)
        loss_sum = spread = torch.zeros((), device=device)
        for step in range(steps):
            x = x_all[perm[step * batch : (step + 1) * batch]].float().div_(255)
            x1, x2 = (views(x, gen).contiguous(memory_format=fmt) for _ in range(2))
            with autocast(device, loop.amp):
                (z1, p1), (z2, p2) = model(x1), model(x2)
                loss = 0.5 * (criterion(p1, z2.detach()) + criterion(p2, z1.detach()))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            loss_sum, spread = loss_sum + loss.detach(), spread + output_std(z1.detach())
        state.epoch += 1
        row = {"epoch": state.epoch, "train_loss": loss_sum.item() / steps, "output_std": spread.item() / steps,
               "lr": opt.param_groups[0]["lr"], "epoch_seconds": time.perf_counter() - t0}
        state.history.append(row)
        if checkpoint:
            _save_checkpoint(checkpoint, digest, state, model, opt, sched, gen)
        if on_epoch is not None:
            on_epoch("train", row)
        bar.update(1)
        tqdm.write(f"pretrain epoch {state.epoch}/{cfg.epochs}: loss {row['train_loss']:.4f} output_std "
                   f"{row['output_std']:.3f} ({row['epoch_seconds']:.1f}s)", file=sys.stderr)
    bar.close()
    history = [measured.pure(row) for row in state.history]
    model_file.save(out_path, {
        "task": TASK, "enabled": True, "arch": arch, "encoder": encoders.to_canonical(net.state_dict(), arch),
        "mean": mean, "std": std, "image_shape": list(ds.image_shape), "history": history,
        "settings": cfg.model_dump(),
    })
    result = {
        "enabled": True, "arch": arch, "device": str(device), "images": int(len(images)),
        "unlabelled_root_images": int(len(extra)), "epochs_run": state.epoch,
        "final_loss": history[-1]["train_loss"], "final_output_std": history[-1]["output_std"],
        "encoder_parameters": count_parameters(backbone), **run_seconds(state.history, len(images)),
    }
    if ds.task == "classification" and len(ds.splits["val"]):
        labelled = labelled_rows(train, params.data.label_fraction, params.data.seed)
        bank_labels, val = torch.from_numpy(train.labels[labelled]), ds.splits["val"]
        random_init = recalibrate(initial.to(device), images, device, params.train.eval_batch_size)
        for key, probed in (("knn_acc", model), ("knn_acc_random_init", random_init)):
            bank = embed(probed, train.images[labelled], device, params.train.eval_batch_size)
            queries = embed(probed, val.images, device, params.train.eval_batch_size)
            result[key] = knn_accuracy(bank, bank_labels, queries, torch.from_numpy(val.labels), cfg.knn_k, len(ds.class_names))
        result["knn_memory_images"] = int(len(labelled))
    else:
        result["knn_note"] = "the kNN probe scores classification only (val labels are classes)"
    atomic.write_json(Path(reports_dir) / "details.json", measured.pure(result))  # no DVC metrics: see dvc.yaml
    measured.write(reports_dir, result)
    if checkpoint:
        checkpoint.unlink(missing_ok=True)
    return result


def register(path: Path, name: str, tags: dict[str, str]) -> dict:
    """Register the backbone file `path` as a version of `name` inside the active MLflow run, unless a version
    of the same content (MD5) exists. A backbone is not served, so the version is no MLflow model: the file is
    logged as the run's artifact `backbone/backbone.pt` and the version's source is that folder
    (`mlflow.artifacts.download_artifacts("models:/<name>/<version>")` fetches it). Tags: the file's MD5,
    `tags` (lineage) and the architecture; the description says what it is."""
    import mlflow
    from mlflow.exceptions import MlflowException

    from visionops.data.fetch import file_md5
    from visionops.serving.promotion import find_version_by_file
    from visionops.serving.registered import MODEL_MD5_TAG

    found = find_version_by_file(name, path)
    if found is not None:
        return {"name": name, "version": str(found.version), "created": False}
    info = model_file.load_weights_only(path, "rerun `visionops pretrain`")
    run = mlflow.active_run()
    mlflow.log_artifact(str(path), artifact_path="backbone")
    client = mlflow.MlflowClient()
    try:
        client.create_registered_model(name, description="SimSiam-pretrained encoders (stage pretrain); "
                                       "`train.init: pretrain` starts from one")
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    version = client.create_model_version(
        name, source=f"{run.info.artifact_uri}/backbone", run_id=run.info.run_id,
        tags={**tags, MODEL_MD5_TAG: file_md5(path), "visionops.arch": info["arch"], "visionops.stage": "pretrain"},
        description=f"{info['arch']} encoder, SimSiam-pretrained for {len(info['history'])} epochs (backbone.pt)")
    return {"name": name, "version": str(version.version), "created": True}
