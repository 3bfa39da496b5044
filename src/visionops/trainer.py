"""The training loop: data held on the device, batched augmentation, resumable checkpoints, DDP.

Shared by `train` (the teacher) and `distill` (the student, with a KD criterion).
"""

from __future__ import annotations

import copy
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
from visionops.augment import BatchAugment
from visionops.config import TrainConfig
from visionops.device import autocast, memory_format

Criterion = Callable[[Tensor, Tensor, Tensor], Tensor]  # (logits, targets, inputs) -> loss
EpochCallback = Callable[[str, dict], None]  # (desc, history row), on the main rank after every epoch


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
    history: list[dict] = field(default_factory=list)
    best_acc: float = -1.0
    best_epoch: int = 0
    best_state: dict | None = None
    stale_epochs: int = 0


def _optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr)
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov and cfg.momentum > 0)


def _scheduler(opt: torch.optim.Optimizer, cfg: TrainConfig, steps_per_epoch: int):
    total = cfg.epochs * steps_per_epoch
    if cfg.schedule == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=total, pct_start=0.25)
    if cfg.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total)
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)


@torch.no_grad()
def evaluate_split(model: nn.Module, x: Tensor, y: Tensor, cfg: TrainConfig, device: torch.device) -> dict:
    """Loss and accuracy of `model` on uint8 NCHW images already on the device."""
    model.eval()
    loss = correct = 0.0
    for start in range(0, len(y), cfg.eval_batch_size):
        xb = x[start : start + cfg.eval_batch_size].float().div_(255)
        yb = y[start : start + cfg.eval_batch_size]
        with autocast(device, cfg.amp):
            logits = model(xb.contiguous(memory_format=memory_format(device, cfg.channels_last))).float()
        loss += nn.functional.cross_entropy(logits, yb, reduction="sum").item()
        correct += (logits.argmax(1) == yb).sum().item()
    n = max(len(y), 1)
    return {"loss": loss / n, "acc": correct / n}


def _save_checkpoint(path: Path, fingerprint: str, state: TrainState, model, opt, sched, gen) -> None:
    payload = {
        "fingerprint": fingerprint,
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
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    if ckpt.get("fingerprint") != fingerprint:
        print(f"train: {path} was made with other settings or data; starting fresh", file=sys.stderr)
        return TrainState()
    model.load_state_dict(ckpt["model"])
    opt.load_state_dict(ckpt["optimizer"])
    sched.load_state_dict(ckpt["scheduler"])
    gen.set_state(ckpt["generator"])
    state = TrainState(**ckpt["state"])
    print(f"train: resuming from {path} after epoch {state.epoch}", file=sys.stderr)
    return state


def fit(
    model: nn.Module,
    train: tuple[Tensor, Tensor],
    val: tuple[Tensor, Tensor],
    cfg: TrainConfig,
    augment: BatchAugment,
    criterion: Criterion,
    device: torch.device,
    checkpoint: Path | None = None,
    fingerprint: str = "",
    dist_info: DistInfo | None = None,
    desc: str = "train",
    on_epoch: EpochCallback | None = None,
) -> tuple[nn.Module, TrainState]:
    """Train `model` on uint8 NCHW tensors already on `device`; return the best model (by val accuracy).

    Every epoch ends with an atomic checkpoint; a rerun with the same `fingerprint` resumes from it.
    Under torchrun each rank trains on its shard of every epoch's permutation. `on_epoch` lets a
    caller (experiment tracking) see each epoch's metrics as they happen.
    """
    dist_info = dist_info or DistInfo()
    torch.manual_seed(cfg.seed)
    (train_x, train_y), (val_x, val_y) = train, val
    fmt = memory_format(device, cfg.channels_last)
    model = model.to(device, memory_format=fmt)
    shard = len(train_y) // dist_info.world_size
    steps = max(math.ceil(shard / cfg.batch_size), 1)
    opt = _optimizer(model, cfg)
    sched = _scheduler(opt, cfg, steps)
    gen = torch.Generator().manual_seed(cfg.seed)
    state = _load_checkpoint(checkpoint, fingerprint, model, opt, sched, gen)
    ddp = nn.parallel.DistributedDataParallel(model) if dist_info.world_size > 1 else model
    step_model = torch.compile(ddp) if cfg.compile and device.type == "cuda" else ddp

    bar = tqdm(total=cfg.epochs, initial=state.epoch, desc=desc, unit="epoch", disable=None if dist_info.is_main else True, file=sys.stderr)
    while state.epoch < cfg.epochs and not _should_stop(state, cfg):
        t0 = time.perf_counter()
        step_model.train()
        perm = torch.randperm(len(train_y), generator=gen)[dist_info.rank :: dist_info.world_size][:shard].to(device)
        seen = loss_sum = correct = 0.0
        for start in range(0, shard, cfg.batch_size):
            idx = perm[start : start + cfg.batch_size]
            xb = train_x[idx].float().div_(255)
            yb = train_y[idx]
            xb, targets = augment(xb, yb, gen)
            xb = xb.contiguous(memory_format=fmt)
            with autocast(device, cfg.amp):
                logits = step_model(xb)
                loss = criterion(logits, targets, xb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            seen += len(idx)
            loss_sum += loss.item() * len(idx)
            hard = targets if targets.ndim == 1 else targets.argmax(1)
            correct += (logits.argmax(1) == hard).sum().item()
        val_metrics = evaluate_split(model, val_x, val_y, cfg, device)
        state.epoch += 1
        row = {
            "epoch": state.epoch,
            "train_loss": loss_sum / max(seen, 1),
            "train_acc": correct / max(seen, 1),
            "val_loss": val_metrics["loss"],
            "val_acc": val_metrics["acc"],
            "lr": opt.param_groups[0]["lr"],
            "seconds": time.perf_counter() - t0,
        }
        state.history.append(row)
        if row["val_acc"] > state.best_acc:
            state.best_acc, state.best_epoch, state.stale_epochs = row["val_acc"], state.epoch, 0
            state.best_state = copy.deepcopy({k: v.detach().cpu() for k, v in model.state_dict().items()})
        else:
            state.stale_epochs += 1
        if dist_info.is_main:
            if checkpoint is not None:
                _save_checkpoint(checkpoint, fingerprint, state, model, opt, sched, gen)
            if on_epoch is not None:
                on_epoch(desc, row)
            bar.update(1)
            bar.set_postfix(loss=f"{row['train_loss']:.3f}", val_acc=f"{row['val_acc']:.4f}")
            tqdm.write(
                f"{desc} epoch {state.epoch}/{cfg.epochs}: train_loss {row['train_loss']:.4f} "
                f"train_acc {row['train_acc']:.4f} val_loss {row['val_loss']:.4f} val_acc {row['val_acc']:.4f} "
                f"({row['seconds']:.1f}s)",
                file=sys.stderr,
            )
    bar.close()
    if state.best_state is not None:
        model.load_state_dict(state.best_state)
    return model.eval(), state


def _should_stop(state: TrainState, cfg: TrainConfig) -> bool:
    return cfg.early_stopping_patience > 0 and state.stale_epochs >= cfg.early_stopping_patience
