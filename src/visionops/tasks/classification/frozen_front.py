"""Training on a frozen front-end's features, computed once per run instead of in every epoch.

A network with a `front` that has no trainable weights (scatternet's scattering transform) and a `head`
gives the same outputs whether its front runs on every batch or once on every image up front, as long as
nothing changes the images between epochs (no augmentation) or at scoring time (no test-time
augmentation). On CIFAR-10 with 2 busy CPU threads the scattering transform took 8.2 s per 1,000 32x32 RGB
images (370 s for the 45,108 train and val images), and a DP-SGD epoch of the linear head 1.4 s per 1,000
(55 s for 40,053 at batch 4,096), so running the front in every epoch would make each about 7x slower.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from visionops.config import AugmentConfig, TrainConfig

AUGMENT_OFF = ("hflip", "rotate_degrees", "crop_padding", "cutout_size", "mixup_alpha", "cutmix_alpha")


class Head(nn.Module):
    """The trainable part of a `Classifier` whose net has a frozen `front`: features in, logits out."""

    def __init__(self, head: nn.Module):
        super().__init__()
        self.head = head

    def forward(self, features: Tensor) -> Tensor:
        return self.head(features)


def frozen_front(model: nn.Module, augment: AugmentConfig, cfg: TrainConfig) -> nn.Module | None:
    """`model.net.front` when its features can be computed once for the whole run, else None."""
    front = getattr(model.net, "front", None)
    if front is None or any(p.requires_grad for p in front.parameters()):
        return None
    if any(getattr(augment, k) for k in AUGMENT_OFF) or augment.auto != "none" or cfg.tta != "none":
        return None
    return front


@torch.no_grad()
def features(model: nn.Module, images: Tensor, batch_size: int) -> Tensor:
    """The front's features of uint8 NCHW `images` (on the model's device), normalised as the model does."""
    out = []
    for start in range(0, len(images), batch_size):
        x = images[start : start + batch_size].float().div_(255)
        out.append(model.net.front((x - model.mean) / model.std))
    return torch.cat(out)
