"""Dense knowledge distillation for the CenterNet-style detectors: Hinton et al. (2015)'s temperature
soft targets applied per heatmap location and class, plus the teacher's box sizes and offsets as soft
regression targets where the teacher is confident (its boxes as soft pseudo-labels).

loss = (1 - alpha) * student's own loss (true boxes)
     + alpha * [ T^2 * KL(sigmoid(t / T) || sigmoid(s / T)) summed over classes and locations
                 + L1(student box maps, teacher box maps) weighted by the teacher's peak heat ] / objects
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from visionops.errors import InvalidInputError
from visionops.models.detection import CenterNet


def check_pair(teacher, student) -> None:
    """Dense KD needs two CenterNet-style nets of the same classes (their maps align cell by cell)."""
    for role, m in (("train.model", teacher), ("distill.student", student)):
        if not isinstance(m.net, CenterNet):
            raise InvalidInputError(f"{role}: dense detection KD needs a CenterNet-style detector (centernet, "
                                    f"centernet_tiny); got {type(m.net).__name__}")


def kd_criterion(teacher, student, alpha: float, temperature: float):
    """The trainer's criterion (output, targets, x) for `student`, with `teacher` (frozen, eval) run on the
    same augmented batch."""
    teacher.eval()
    k = student.net.num_classes

    def criterion(out: Tensor, targets: tuple[Tensor, Tensor], x: Tensor) -> Tensor:
        hard = student.loss(out, targets, x)
        with torch.no_grad():
            t = teacher(x).float()
        s = out.float()
        n_obj = (targets[1] >= 0).sum().clamp_min(1)
        soft = torch.sigmoid(t[:, :k] / temperature)
        # Bernoulli KL per location and class = BCE(student) - BCE(teacher) against the teacher's soft target
        kl = (F.binary_cross_entropy_with_logits(s[:, :k] / temperature, soft, reduction="sum")
              - F.binary_cross_entropy_with_logits(t[:, :k] / temperature, soft, reduction="sum"))
        weight = torch.sigmoid(t[:, :k]).amax(1, keepdim=True)  # the teacher's confidence per location
        box = (F.l1_loss(s[:, k:], t[:, k:], reduction="none") * weight).sum()
        return (1 - alpha) * hard + alpha * (temperature**2 * kl + box) / n_obj

    return criterion
