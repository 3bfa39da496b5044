"""The training loop: data held on the device, batched augmentation, resumable checkpoints, DDP.

Shared by every task's `train`, `baseline` and `distill`: the task supplies the targets, the
augmentation, the loss and the validation score the loop selects by.
"""

from __future__ import annotations

import copy
import itertools
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from torch import Tensor, nn
from tqdm import tqdm

from visionops.atomic import atomic_path
from visionops.config import TrainConfig
from visionops.models.model_file import load_weights_only
from visionops.training.device import autocast, memory_format
from visionops.training.lookahead import Lookahead
from visionops.training.privacy import DPSGD, check_settings, group_norm, unwrap

Targets = Tensor | tuple[Tensor, ...]  # per-image targets, indexed by image on the first axis
Criterion = Callable[[object, Targets, Tensor], Tensor]  # (model output, targets, inputs) -> loss
Augment = Callable[[Tensor, Targets, torch.Generator], tuple[Tensor, Targets]]  # (float images, targets, rng)
Evaluate = Callable[[nn.Module], dict]  # model -> {"loss": ..., <metric>: ...} on the validation split
TrainCorrect = Callable[[object, Targets], Tensor]  # (model output, targets) -> right predictions in the batch
EpochCallback = Callable[[str, dict], None]  # (desc, history row), on the main rank after every epoch
EpochStart = Callable[[int], None]  # (0-based epoch), on every rank before the epoch's steps


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device_type: str) -> DistInfo:
    """Join the process group when launched by torchrun (WORLD_SIZE > 1); gloo on CPU, nccl on CUDA."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device_type == "cuda" else "gloo")
    return DistInfo(dist.get_rank(), dist.get_world_size())


@dataclass
class TrainState:
    """Everything a checkpoint holds, so a killed run resumes exactly where it stopped."""

    epoch: int = 0
    steps: int = 0  # optimiser steps taken
    history: list[dict] = field(default_factory=list)
    best_acc: float = -1.0
    best_epoch: int = 0
    best_state: dict | None = None
    stale_epochs: int = 0
    accountant: list = field(default_factory=list)  # DP-SGD: the accountant's (noise multiplier, sample rate, steps)
    privacy: dict | None = None  # DP-SGD: the run's (ε, δ) and settings (`DPSGD.record`), set when it ends


NORM_LAYERS = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)


def _optimizer(model: nn.Module, cfg: TrainConfig, transferred: frozenset[str] = frozenset()) -> torch.optim.Optimizer:
    """Weight decay on weights only; norm layers' scales and shifts learn at lr * norm_lr_scale; the
    `transferred` parameters (names, those a starting point gave) at those rates * backbone_lr_scale.

    Frozen parameters are left out.
    """
    norm = {id(p) for m in model.modules() if isinstance(m, NORM_LAYERS) for p in m.parameters(recurse=False)}
    groups = []
    for moved, scale in ((False, 1.0), (True, cfg.backbone_lr_scale)):  # the new layers' groups first, as without a start
        trainable = [p for n, p in model.named_parameters() if p.requires_grad and (n in transferred) == moved]
        lr = cfg.lr * scale
        groups += [
            {"params": [p for p in trainable if p.ndim > 1 and id(p) not in norm], "weight_decay": cfg.weight_decay, "lr": lr},
            {"params": [p for p in trainable if p.ndim <= 1 and id(p) not in norm], "weight_decay": 0.0, "lr": lr},
            {"params": [p for p in trainable if id(p) in norm], "weight_decay": 0.0, "lr": lr * cfg.norm_lr_scale},
        ]
    groups = [g for g in groups if g["params"]]
    if cfg.optimizer == "adamw":  # fused: one kernel for all parameters (`unet`: 0.37 against 1.51 ms a step on 2 CPU cores)
        return torch.optim.AdamW(groups, lr=cfg.lr, fused=True)
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov and cfg.momentum > 0)


def triangle(step: int, total: int, start: float = 0.2, peak_at: float = 0.23, end: float = 0.07) -> float:
    """airbench's lr factor: linear from `start` up to 1 at `peak_at` of training, then linear down to `end`."""
    peak = max(peak_at * total, 1)
    if step < peak:
        return start + (1 - start) * step / peak
    return 1 - (1 - end) * min((step - peak) / max(total - peak, 1), 1.0)


def plan(cfg: TrainConfig, n_train: int, world_size: int = 1) -> tuple[int, int, int]:
    """(steps per epoch, epochs, optimiser steps) of a run on `n_train` images: with `cfg.steps` set, exactly
    that many steps in ceil(steps / steps per epoch) epochs, the last one stopping when they are done;
    else `cfg.epochs` whole epochs."""
    per_epoch = max(math.ceil(n_train // world_size / cfg.batch_size), 1)
    total = cfg.steps or cfg.epochs * per_epoch
    return per_epoch, math.ceil(total / per_epoch), total


def _scheduler(opt: torch.optim.Optimizer, cfg: TrainConfig, total: int):
    """The learning-rate schedule over `total` optimiser steps."""
    if cfg.schedule == "onecycle":
        max_lr = [group["lr"] for group in opt.param_groups]
        return torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=max_lr, total_steps=total, pct_start=0.25)
    if cfg.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total)
    if cfg.schedule == "triangle":
        return torch.optim.lr_scheduler.LambdaLR(opt, lambda step: triangle(step, total))
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)


@torch.no_grad()
def init_from_data(model: nn.Module, images: Tensor, sample: int = 5000, seed: int = 0) -> None:
    """Give each submodule with an `init_from_data(inputs)` method (fastnet's whitening stem) the
    inputs it sees for a random sample of the uint8 NCHW training `images`."""
    targets = [m for m in model.modules() if hasattr(m, "init_from_data")]
    if not targets:
        return
    idx = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))[:sample].to(images.device)
    seen: dict[nn.Module, Tensor] = {}
    hooks = [m.register_forward_pre_hook(lambda mod, args: seen.setdefault(mod, args[0])) for m in targets]
    try:
        model.eval()(images[idx].float().div_(255))
    finally:
        for hook in hooks:
            hook.remove()
    for m in targets:
        m.init_from_data(seen[m])


def _save_checkpoint(path: Path, fingerprint: str, state: TrainState, model, opt, sched, gen) -> None:
    """Only tensors and plain values (the RNG state is a uint8 tensor): loadable with `weights_only=True`."""
    payload = {
        "fingerprint": fingerprint,
        "generator_device": gen.device.type,
        "state": state.__dict__,
        "model": model.state_dict(),
        "optimizer": opt.state_dict(),
        "scheduler": sched.state_dict(),
        "generator": gen.get_state(),
    }
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


def _load_checkpoint(path: Path | None, fingerprint: str, model, opt, sched, gen) -> TrainState:
    if path is None or not path.exists():
        return TrainState()
    ckpt = load_weights_only(path, "delete it to train from the start")
    if ckpt.get("fingerprint") != fingerprint or ckpt.get("generator_device", "cpu") != gen.device.type:
        print(f"train: {path} was made with other settings or data; starting fresh", file=sys.stderr)
        return TrainState()
    model.load_state_dict(ckpt["model"])
    opt.load_state_dict(ckpt["optimizer"])
    sched.load_state_dict(ckpt["scheduler"])
    gen.set_state(ckpt["generator"])
    state = TrainState(**ckpt["state"])
    print(f"train: resuming from {path} after epoch {state.epoch}", file=sys.stderr)
    return state


def to_inputs(x: Tensor) -> Tensor:
    """uint8 images as floats in [0, 1]; float inputs (precomputed features) as they are."""
    return x.float().div_(255) if x.dtype == torch.uint8 else x


def _take(targets: Targets, idx: Tensor) -> Targets:
    return tuple(t[idx] for t in targets) if isinstance(targets, tuple) else targets[idx]


def fit(
    model: nn.Module,
    train: tuple[Tensor, Targets],
    evaluate: Evaluate,
    cfg: TrainConfig,
    augment: Augment,
    criterion: Criterion,
    device: torch.device,
    checkpoint: Path | None = None,
    fingerprint: str = "",
    dist_info: DistInfo | None = None,
    desc: str = "train",
    on_epoch: EpochCallback | None = None,
    metric: str = "acc",
    train_correct: TrainCorrect | None = None,
    on_epoch_start: EpochStart | None = None,
    transferred: frozenset[str] = frozenset(),
) -> tuple[nn.Module, TrainState]:
    """Train `model` on uint8 NCHW images (and their targets) already on `device`; return the best
    model by `evaluate(model)[metric]`, the validation score (higher is better).

    History rows hold train_loss, val_loss and val_<metric> (and train_<metric>, the fraction
    `train_correct` counts, when given). Every epoch ends with an atomic checkpoint; a rerun with the
    same `fingerprint` resumes from it. With `cfg.privacy.enabled` it trains with DP-SGD (`privacy`): batch
    norm becomes group norm, batches are Poisson-sampled, rows hold the ε spent, training stops before an
    epoch that would pass the budget, and `state.privacy` holds the final (ε, δ).
    Under torchrun each rank trains on its shard of every epoch's permutation. `on_epoch` lets a
    caller (experiment tracking) see each epoch's metrics as they happen; `on_epoch_start` lets the
    augmentation follow a per-epoch schedule (progressive resizing). `transferred` names the parameters a
    starting point gave (`training.starting_point`): they learn at lr * cfg.backbone_lr_scale, and are not
    updated in the first cfg.freeze_epochs epochs (their gradients are dropped before each step; batch-norm
    running statistics still follow the data). On CUDA the random
    numbers come from a CUDA generator and nothing waits for the GPU until the epoch ends.
    """
    dist_info = dist_info or DistInfo()
    torch.manual_seed(cfg.seed)
    train_x, train_y = train
    fmt = memory_format(device, cfg.channels_last)
    dp = converted = None
    if cfg.privacy.enabled:
        check_settings(cfg, model, device, dist_info.world_size)
        model, converted = group_norm(model)
        dp = DPSGD(cfg.privacy, len(train_x), cfg.batch_size, cfg.epochs)
    model = model.to(device, memory_format=fmt)
    shard = len(train_x) // dist_info.world_size
    steps, epochs, total = plan(cfg, len(train_x), dist_info.world_size)
    opt = _optimizer(model, cfg, transferred)
    frozen = [p for n, p in model.named_parameters() if n in transferred] if cfg.freeze_epochs else []
    sched = _scheduler(opt, cfg, total)
    gen = torch.Generator(device=device if device.type == "cuda" else "cpu").manual_seed(cfg.seed)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    state = _load_checkpoint(checkpoint, fingerprint, model, opt, sched, gen)
    if state.epoch == 0:
        init_from_data(model, train_x, seed=cfg.seed)
    lookahead = Lookahead(model, total) if cfg.lookahead else None
    if lookahead is not None:
        lookahead.resume(state.epoch * steps)
    ddp = nn.parallel.DistributedDataParallel(model) if dist_info.world_size > 1 else model
    step_model = torch.compile(ddp) if cfg.compile and device.type == "cuda" else ddp
    step_opt = opt
    if dp is not None:
        dp.accountant.history = [tuple(h) for h in state.accountant]
        step_model, step_opt = dp.wrap(model, opt, gen)

    train_key, val_key = f"train_{metric}", f"val_{metric}"
    quiet = None if dist_info.is_main else True  # tqdm: None = off when stderr is not a terminal
    bar = tqdm(total=epochs, initial=state.epoch, desc=desc, unit="epoch", disable=quiet, file=sys.stderr)
    while state.epoch < epochs and not _should_stop(state, cfg) and (dp is None or dp.next_epoch_fits()):
        t0 = time.perf_counter()
        if on_epoch_start is not None:
            on_epoch_start(state.epoch)
        step_model.train()
        if dp is not None:
            batches_idx = dp.batches(gen, device)
        else:
            perm = torch.randperm(len(train_x), generator=gen, device=gen.device)[dist_info.rank :: dist_info.world_size][:shard].to(device)
            batches_idx = (perm[start : start + cfg.batch_size] for start in range(0, shard, cfg.batch_size))
        batches_idx = itertools.islice(batches_idx, min(steps, total - state.steps))  # train.steps: a partial last epoch
        seen, loss_sum = 0, torch.zeros((), device=device)
        correct = torch.zeros((), device=device, dtype=torch.long)
        batches = tqdm(total=steps, desc=f"{desc} epoch {state.epoch + 1}", unit="batch", leave=False, disable=quiet,
                       file=sys.stderr)  # within the epoch (no loss shown: that would wait for the device each step)
        for step, idx in enumerate(batches_idx, start=state.epoch * steps + 1):
            xb = to_inputs(train_x[idx])
            yb = _take(train_y, idx)
            xb, targets = augment(xb, yb, gen)
            xb = xb.contiguous(memory_format=fmt)
            with autocast(device, cfg.amp):
                logits = step_model(xb)
                loss = criterion(logits, targets, xb)
            step_opt.zero_grad(set_to_none=True)
            loss.backward()
            if frozen and state.epoch < cfg.freeze_epochs:
                for p in frozen:
                    p.grad = None  # SGD and AdamW skip a parameter without a gradient: no decay, no momentum
            step_opt.step()
            sched.step()
            state.steps += 1
            if lookahead is not None:
                lookahead.step(step)
            seen += len(idx)
            loss_sum += loss.detach() * len(idx)
            if train_correct is not None:
                correct += train_correct(logits, targets)
            batches.update(1)
        batches.close()
        if lookahead is not None:
            lookahead.sync()
        train_loss, n_correct = loss_sum.item(), correct.item()  # the epoch's one wait for the device
        train_seconds = time.perf_counter() - t0
        val_metrics = evaluate(model)
        state.epoch += 1
        row = {
            "epoch": state.epoch,
            "train_loss": train_loss / max(seen, 1),
            **({train_key: n_correct / max(seen, 1)} if train_correct is not None else {}),
            "val_loss": val_metrics["loss"],
            val_key: val_metrics[metric],
            "lr": opt.param_groups[0]["lr"],
            **({"epsilon": dp.epsilon()} if dp is not None else {}),
            "epoch_train_seconds": train_seconds,  # the optimisation steps alone
            "epoch_seconds": time.perf_counter() - t0,  # with the val pass
        }
        state.history.append(row)
        if row[val_key] > state.best_acc:
            state.best_acc, state.best_epoch, state.stale_epochs = row[val_key], state.epoch, 0
            state.best_state = copy.deepcopy({k: v.detach().cpu() for k, v in model.state_dict().items()})
        else:
            state.stale_epochs += 1
        if dp is not None:
            state.accountant = list(dp.accountant.history)
        if dist_info.is_main:
            if checkpoint is not None:
                _save_checkpoint(checkpoint, fingerprint, state, model, opt, sched, gen)
            if on_epoch is not None:
                on_epoch(desc, row)
            bar.update(1)
            bar.set_postfix({"loss": f"{row['train_loss']:.3f}", val_key: f"{row[val_key]:.4f}"})
            shown = " ".join(f"{k} {v:.4f}" for k, v in row.items() if k.startswith(("train_", "val_", "epsilon")) and "seconds" not in k)
            tqdm.write(f"{desc} epoch {state.epoch}/{epochs}: {shown} ({row['epoch_seconds']:.1f}s)", file=sys.stderr)
    bar.close()
    if dp is not None:
        unwrap(step_model)
        state.privacy = dp.record(converted)
    if state.best_state is not None:
        model.load_state_dict(state.best_state)
    return model.eval(), state


def _should_stop(state: TrainState, cfg: TrainConfig) -> bool:
    return cfg.early_stopping_patience > 0 and state.stale_epochs >= cfg.early_stopping_patience
