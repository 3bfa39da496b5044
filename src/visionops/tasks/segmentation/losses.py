"""Per-pixel losses: class-weighted cross-entropy and pixel-wise Hinton distillation."""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from visionops.tasks.segmentation.segmenter import IGNORE


class PixelLoss(nn.Module):
    """Cross-entropy over pixels, each weighted by its true class's `pixel_weights` (None: unweighted);
    pixels marked IGNORE count for nothing."""

    def __init__(self, pixel_weights: list[float] | None = None):
        super().__init__()
        weight = torch.tensor(pixel_weights, dtype=torch.float32) if pixel_weights is not None else None
        self.register_buffer("weight", weight)

    def forward(self, logits: Tensor, masks: Tensor) -> Tensor:
        return F.cross_entropy(logits.float(), masks.long(), weight=self.weight, ignore_index=IGNORE)


def pixel_kd_loss(student: Tensor, teacher: Tensor, temperature: float, masks: Tensor | None = None) -> Tensor:
    """Hinton et al. (2015) per pixel: KL(teacher || student) of the temperature-softened class
    distributions at each pixel, averaged over the pixels not marked IGNORE, times T^2 (so its gradient
    keeps the hard loss's scale as T changes)."""
    t = temperature
    kl = F.kl_div(F.log_softmax(student.float() / t, 1), F.log_softmax(teacher.float() / t, 1), reduction="none", log_target=True).sum(1)
    if masks is not None:
        keep = masks != IGNORE
        kl = kl[keep] if keep.any() else kl.new_zeros(1)
    return kl.mean() * t * t


class PixelDistillationLoss:
    """A trainer criterion: `alpha * pixel_kd_loss(student, teacher(x), T) + (1 - alpha) * hard(student, masks)`.
    The teacher runs frozen on the same augmented batch the student sees."""

    def __init__(self, hard: nn.Module, teacher: nn.Module | None, alpha: float, temperature: float):
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
                teacher = self.teacher(inputs)
            loss = loss + self.alpha * pixel_kd_loss(logits, teacher, self.temperature, masks)
        return loss
