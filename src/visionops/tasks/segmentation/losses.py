"""Per-pixel losses: class-weighted cross-entropy plus soft Dice, and pixel-wise Hinton distillation."""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from visionops.tasks.segmentation.segmenter import IGNORE


def soft_dice_loss(logits: Tensor, masks: Tensor, probs: Tensor | None = None) -> Tensor:
    """1 - the soft Dice coefficient per class over the batch (Milletari et al. 2016), averaged over classes:
    every class counts equally, as in mIoU. Pixels marked IGNORE count for nothing. `probs` (the softmax of
    `logits`) may be passed when the caller has it.

    Per class, the overlap is summed by scatter-adding each pixel's probability of its true class rather
    than through a one-hot tensor of the masks, and `PixelLoss` shares one log-softmax with the
    cross-entropy: its forward and backward went from 0.50 to 0.26 ms per 64 x 64 image (11 classes,
    2 CPU cores), against about 3 ms for the network's own step."""
    k = logits.shape[1]
    valid = masks != IGNORE
    probs = (logits.float().softmax(1) if probs is None else probs) * valid.unsqueeze(1)
    target = torch.where(valid, masks.long(), 0)
    truth = probs.gather(1, target.unsqueeze(1)).flatten()  # each pixel's probability of its true class
    inter = probs.new_zeros(k).scatter_add(0, target.flatten(), truth)
    count = torch.bincount(target[valid], minlength=k).to(probs.dtype)
    total = probs.sum((0, 2, 3)) + count
    return (1 - (2 * inter + 1) / (total + 1)).mean()


class PixelLoss(nn.Module):
    """Cross-entropy over pixels, each weighted by its true class's `pixel_weights` (None: unweighted), plus
    `dice` x soft Dice; pixels marked IGNORE count for nothing. On the default canvases the Dice term raised
    test mIoU after 6 epochs from 0.63 to 0.66 (with the earlier, full-resolution-decoder U-Net)."""

    def __init__(self, pixel_weights: list[float] | None = None, dice: float = 1.0):
        super().__init__()
        weight = torch.tensor(pixel_weights, dtype=torch.float32) if pixel_weights is not None else None
        self.register_buffer("weight", weight)
        self.dice = dice

    def forward(self, logits: Tensor, masks: Tensor) -> Tensor:
        log_probs = F.log_softmax(logits.float(), 1)
        loss = F.nll_loss(log_probs, masks.long(), weight=self.weight, ignore_index=IGNORE)
        return loss + self.dice * soft_dice_loss(logits, masks, log_probs.exp()) if self.dice else loss


def pixel_kd_loss(student: Tensor, teacher: Tensor, temperature: float, masks: Tensor | None = None,
                  weight: Tensor | None = None) -> Tensor:
    """Hinton et al. (2015) per pixel: KL(teacher || student) of the temperature-softened class
    distributions at each pixel, times T^2 (so its gradient keeps the hard loss's scale as T changes).
    Averaged over the pixels not marked IGNORE; with `weight` (per class, indexed by each pixel's true
    class in `masks`) a weighted average, as the hard loss's class-weighted cross-entropy."""
    t = temperature
    kl = F.kl_div(F.log_softmax(student.float() / t, 1), F.log_softmax(teacher.float() / t, 1), reduction="none", log_target=True).sum(1)
    if masks is None:
        return kl.mean() * t * t
    keep = masks != IGNORE
    if not keep.any():
        return kl.new_zeros(())
    w = weight[masks[keep].long()] if weight is not None else torch.ones_like(kl[keep])
    return (kl[keep] * w).sum() / w.sum() * t * t


class PixelDistillationLoss:
    """A trainer criterion: `alpha * pixel_kd_loss(student, teacher(x), T) + (1 - alpha) * hard(student, masks)`.

    The teacher runs frozen on the same augmented batch the student sees. Its soft targets are its logits
    before its served prior correction (`Segmenter.logit_bias`), and its pixels are weighted by the hard
    loss's class weights: the student learns what the teacher learned, under the same class balance as its
    own hard term (on the default canvases an unweighted KD term, 85% background pixels, kept the student
    at test mIoU 0.25 against 0.67 alone).
    """

    def __init__(self, hard: PixelLoss, teacher: nn.Module | None, alpha: float, temperature: float):
        if alpha > 0 and teacher is None:
            raise ValueError("a teacher is needed when alpha > 0")
        self.hard, self.teacher, self.alpha, self.temperature = hard, teacher, alpha, temperature
        if teacher is not None:
            teacher.eval().requires_grad_(False)

    def __call__(self, logits: Tensor, masks: Tensor, inputs: Tensor) -> Tensor:
        loss = logits.new_zeros((), dtype=torch.float32)
        if self.alpha < 1:
            loss = loss + (1 - self.alpha) * self.hard(logits, masks)
        if self.alpha > 0:
            with torch.no_grad():
                teacher = self.teacher(inputs) - self.teacher.logit_bias
            loss = loss + self.alpha * pixel_kd_loss(logits, teacher, self.temperature, masks, self.hard.weight)
        return loss
