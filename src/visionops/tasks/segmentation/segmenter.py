"""A trained segmentation network bundled with its preprocessing, saved and loaded as one artifact.

`Segmenter` takes uint8 (or 0..1 float) N x C x H x W images and returns per-pixel logits
N x K x H x W; normalisation is inside, so training, evaluation, ONNX export and serving call the same
forward. The model file holds only tensors and plain values (loadable with `weights_only=True`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn import functional as F

from visionops.data.images import Placement
from visionops.models import create_model, model_file

IGNORE = 255  # mask value of pixels no loss or metric counts


class Segmenter(nn.Module):
    """The network with its normalisation and its served prior correction: `logit_bias` (one value per
    class, added to the logits) undoes part of the class weighting the network was trained with, as
    fitted on val (`fit_prior_correction`); zeros until then."""

    def __init__(self, net: nn.Module, mean: list[float], std: list[float], num_classes: int):
        super().__init__()
        self.net = net
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("logit_bias", torch.zeros(1, num_classes, 1, 1))

    def uncorrected(self, x: Tensor) -> Tensor:
        """The network's logits, before the prior correction (what the students distil)."""
        if x.dtype == torch.uint8:
            x = x.float() / 255
        return self.net((x - self.mean) / self.std)

    def forward(self, x: Tensor) -> Tensor:
        logits = self.uncorrected(x)
        # in the logits' dtype: a float32 bias would make bf16 training write (and backpropagate) float32 logits
        return logits + self.logit_bias.to(logits.dtype)


def build(arch: str, class_names: list[str], image_shape, mean, std) -> Segmenter:
    h, _, c = image_shape
    net = create_model(arch, in_channels=c, num_classes=len(class_names), image_size=h)
    return Segmenter(net, list(mean), list(std), len(class_names))


def save(path: Path, model: Segmenter, arch: str, class_names: list[str], image_shape, **extra) -> None:
    payload = {
        "task": "segmentation",
        "arch": arch,
        "class_names": list(class_names),
        "image_shape": [int(s) for s in image_shape],
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        **extra,
    }
    model_file.save(path, payload)


def load(path: Path | str, device: torch.device | str = "cpu") -> tuple[Segmenter, dict]:
    """Rebuild a saved segmenter in eval mode; also returns the saved metadata."""
    info = model_file.read(path, "segmentation")
    state = info.pop("state_dict")
    model = build(info["arch"], info["class_names"], tuple(info["image_shape"]), state["mean"].flatten(), state["std"].flatten())
    model.load_state_dict(state)
    return model.to(device).eval(), info


@torch.no_grad()
def predict_logits(model: nn.Module, images_nhwc, device: torch.device | str = "cpu", batch_size: int = 256) -> Tensor:
    """Float logits N x K x H x W (on the CPU) for a uint8 N x H x W x C array, in batches."""
    model = model.eval()
    out = []
    for start in range(0, len(images_nhwc), batch_size):
        chunk = torch.as_tensor(np.array(images_nhwc[start : start + batch_size])).to(device).permute(0, 3, 1, 2)
        out.append(model(chunk).float().cpu())
    return torch.cat(out)


def source_mask(logits: Tensor, where: Placement) -> np.ndarray:
    """The uint8 class mask at the source size of one image's K x H x W logits: the part of the square that shows
    the image (`where`, its `images.Placement`), resized bilinearly to the source's height x width, then argmax."""
    x = where.crop(logits.permute(1, 2, 0)).permute(2, 0, 1)[None]
    width, height = where.source
    if tuple(x.shape[2:]) != (height, width):
        x = F.interpolate(x, size=(height, width), mode="bilinear", align_corners=False)
    return x[0].argmax(0).to(torch.uint8).numpy()


@torch.no_grad()
def predict_masks(model: nn.Module, images_nhwc, device: torch.device | str = "cpu", batch_size: int = 256) -> np.ndarray:
    """Predicted class index per pixel, uint8 N x H x W."""
    masks = [
        predict_logits(model, images_nhwc[start : start + batch_size], device, batch_size).argmax(1).to(torch.uint8)
        for start in range(0, len(images_nhwc), batch_size)
    ]
    h, w = np.asarray(images_nhwc[:0]).shape[1:3]
    return torch.cat(masks).numpy() if masks else np.zeros((0, h, w), np.uint8)
