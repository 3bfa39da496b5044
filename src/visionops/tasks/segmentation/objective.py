"""What segmentation's training loop selects by: val loss and val mIoU, tallied on the device."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from visionops.config import TrainConfig
from visionops.tasks.segmentation.metrics import confusion, miou_from_confusion
from visionops.training.device import autocast, memory_format
from visionops.training.trainer import Evaluate

METRIC = "miou"


@torch.no_grad()
def evaluate_split(model: nn.Module, x: Tensor, masks: Tensor, loss_fn: nn.Module, cfg: TrainConfig, device: torch.device) -> dict:
    """Mean pixel loss and mIoU of `model` on uint8 NCHW images and uint8 N x H x W masks on the device."""
    model.eval()
    k = None
    cm, loss = None, torch.zeros((), device=device)
    for start in range(0, len(x), cfg.eval_batch_size):
        xb = x[start : start + cfg.eval_batch_size].float().div_(255).contiguous(memory_format=memory_format(device, cfg.channels_last))
        mb = masks[start : start + cfg.eval_batch_size]
        with autocast(device, cfg.amp):
            logits = model(xb).float()
        k = logits.shape[1]
        loss += loss_fn(logits, mb) * len(xb)
        batch = confusion(logits.argmax(1), mb, k)
        cm = batch if cm is None else cm + batch
    if cm is None:
        return {"loss": float("nan"), METRIC: float("nan")}
    return {"loss": loss.item() / len(x), METRIC: miou_from_confusion(cm)}


def val_scorer(val: tuple[Tensor, Tensor], loss_fn: nn.Module, cfg: TrainConfig, device: torch.device) -> Evaluate:
    return lambda model: evaluate_split(model, *val, loss_fn, cfg, device)
