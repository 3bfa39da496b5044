"""Training losses: cross-entropy with the imbalance options, and Hinton distillation."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


class ClassificationLoss(torch.nn.Module):
    """Cross-entropy with label smoothing, optional class weights and optional logit adjustment.

    Targets are class indices or (N, C) soft targets (MixUp/CutMix). Logit adjustment
    (Menon et al., 2021) adds tau * log(prior) to the logits during training only.
    """

    def __init__(
        self,
        label_smoothing: float = 0.0,
        class_weights: list[float] | None = None,
        class_priors: list[float] | None = None,
        tau: float = 1.0,
    ):
        super().__init__()
        self.label_smoothing = label_smoothing
        self.register_buffer("weight", torch.tensor(class_weights, dtype=torch.float32) if class_weights else None)
        adjust = tau * torch.log(torch.tensor(class_priors, dtype=torch.float32).clamp_min(1e-12)) if class_priors else None
        self.register_buffer("adjustment", adjust)

    def forward(self, logits: Tensor, targets: Tensor) -> Tensor:
        if self.adjustment is not None:
            logits = logits + self.adjustment
        return F.cross_entropy(logits.float(), targets, weight=self.weight, label_smoothing=self.label_smoothing)


def kd_loss(student_logits: Tensor, teacher_logits: Tensor, temperature: float) -> Tensor:
    """Hinton et al. (2015): KL(teacher_T || student_T) scaled by T^2 so its gradients match CE's scale."""
    t = temperature
    log_p_student = F.log_softmax(student_logits.float() / t, dim=1)
    log_p_teacher = F.log_softmax(teacher_logits.float() / t, dim=1)
    return F.kl_div(log_p_student, log_p_teacher, reduction="batchmean", log_target=True) * (t * t)
