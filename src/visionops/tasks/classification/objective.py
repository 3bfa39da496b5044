"""What classification's training loop selects by: val loss and accuracy, and the train accuracy."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from visionops.config import TrainConfig
from visionops.tasks.classification.tta import tta_logits
from visionops.training.device import autocast, memory_format
from visionops.training.trainer import Evaluate, to_inputs


@torch.no_grad()
def evaluate_split(model: nn.Module, x: Tensor, y: Tensor, cfg: TrainConfig, device: torch.device) -> dict:
    """Loss and accuracy of `model` (with `cfg.tta`) on uint8 NCHW images (or precomputed float features) on the device."""
    model.eval()
    loss = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.long)
    for start in range(0, len(y), cfg.eval_batch_size):
        xb = to_inputs(x[start : start + cfg.eval_batch_size])
        yb = y[start : start + cfg.eval_batch_size]
        with autocast(device, cfg.amp):
            logits = tta_logits(model, xb.contiguous(memory_format=memory_format(device, cfg.channels_last)), cfg.tta).float()
        loss += nn.functional.cross_entropy(logits, yb, reduction="sum")
        correct += (logits.argmax(1) == yb).sum()
    n = max(len(y), 1)
    return {"loss": loss.item() / n, "acc": correct.item() / n}


def val_scorer(val: tuple[Tensor, Tensor], cfg: TrainConfig, device: torch.device) -> Evaluate:
    """`fit`'s evaluate: loss and accuracy on the uint8 NCHW val images `val` (on the device)."""
    return lambda model: evaluate_split(model, *val, cfg, device)


def train_correct(logits: Tensor, targets: Tensor) -> Tensor:
    """Right predictions in a batch (targets: class indices, or soft mixup/cutmix rows)."""
    hard = targets if targets.ndim == 1 else targets.argmax(1)
    return (logits.argmax(1) == hard).sum()
