"""Test-time augmentation: average a model's logits over mirrored and shifted views (airbench's levels)."""

from __future__ import annotations

from typing import Literal, get_args

import torch.nn.functional as F
from torch import Tensor, nn

TTA = Literal["none", "flip", "flip_translate"]
TTA_LEVELS = get_args(TTA)


def _mirror(model: nn.Module, x: Tensor) -> Tensor:
    return 0.5 * model(x) + 0.5 * model(x.flip(-1))


def tta_logits(model: nn.Module, x: Tensor, level: TTA = "none") -> Tensor:
    """Logits of `x` (N, C, H, W floats): as is, averaged with the mirror image, or also with one-pixel shifts.

    `flip_translate` weighs the unshifted pair 1/2 and the up-left and down-right shifted pairs 1/4 each.
    """
    if level == "none":
        return model(x)
    logits = _mirror(model, x)
    if level == "flip":
        return logits
    h, w = x.shape[-2:]
    padded = F.pad(x, (1, 1, 1, 1), mode="reflect")
    shifted = [_mirror(model, padded[..., :h, :w]), _mirror(model, padded[..., 2 : h + 2, 2 : w + 2])]
    return 0.5 * logits + 0.25 * (shifted[0] + shifted[1])
