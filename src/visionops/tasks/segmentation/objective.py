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


PRIOR_STRENGTHS = (0.0, 0.25, 0.5, 0.75, 1.0)  # the share of the class weights' log undone, tried on val


@torch.no_grad()
def fit_prior_correction(model: nn.Module, x: Tensor, masks: Tensor, weights: list[float] | None, cfg: TrainConfig,
                         device: torch.device) -> float:
    """Set `model.logit_bias` to -s * log(class weight), with the strength s in PRIOR_STRENGTHS that gives the
    best val mIoU (the smallest on ties); returns s. Without class weights (None) there is nothing to undo: 0.

    Training with class weights w makes the network paint the rare classes too generously: its logits
    estimate log(w_c p(c | pixel)). Subtracting log w in full gives back p(c | pixel), the per-pixel accuracy
    optimum; IoU is best somewhere between, so the strength is fitted, like classification's temperature.
    """
    model.eval()
    if weights is None:
        model.logit_bias.zero_()
        return 0.0
    logits = []
    for start in range(0, len(x), cfg.eval_batch_size):
        xb = x[start : start + cfg.eval_batch_size].float().div_(255).contiguous(memory_format=memory_format(device, cfg.channels_last))
        with autocast(device, cfg.amp):
            logits.append(model(xb).float())
    if not logits:
        return 0.0
    logits = torch.cat(logits)
    log_w = torch.log(torch.tensor(weights, dtype=torch.float32, device=device)).view(1, -1, 1, 1)
    k = logits.shape[1]
    scores = [miou_from_confusion(confusion((logits - s * log_w).argmax(1), masks, k)) for s in PRIOR_STRENGTHS]
    best = PRIOR_STRENGTHS[max(range(len(scores)), key=lambda i: (scores[i], -i))]
    model.logit_bias.copy_(-best * log_w)
    return best
