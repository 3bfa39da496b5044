"""A trained network bundled with its preprocessing and its served prediction rule, saved and loaded as one artifact.

The served rule is part of the model file: the test-time augmentation that model selection scored
val with (`tta`), and the temperature fitted on val after training (`temperature`). `predict_logits`
(and so evaluate, promotion, `visionops predict` and the served pyfunc model) applies both; the
network's own `forward` stays the raw logits that training, Grad-CAM and ONNX export use.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from visionops.models import create_model, model_file
from visionops.tasks.classification.tta import TTA_LEVELS, tta_logits


class Classifier(nn.Module):
    """Images in (uint8 0..255 or float 0..1, N x C x H x W), logits out; normalisation is inside."""

    def __init__(self, net: nn.Module, mean: list[float], std: list[float], temperature: float = 1.0, tta: str = "none"):
        super().__init__()
        self.net = net
        self.temperature, self.tta = float(temperature), tta  # the served rule (plain values, saved by `save`)
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        if x.dtype == torch.uint8:
            x = x.float() / 255
        return self.net((x - self.mean) / self.std)


class Served(nn.Module):
    """The served predictor of a `Classifier`: its test-time augmentation, then logits / temperature."""

    def __init__(self, model: nn.Module, calibrated: bool = True):
        super().__init__()
        self.model, self.calibrated = model, calibrated

    def forward(self, x: Tensor) -> Tensor:
        if x.dtype == torch.uint8:
            x = x.float() / 255
        logits = tta_logits(self.model, x, getattr(self.model, "tta", "none"))
        return logits / getattr(self.model, "temperature", 1.0) if self.calibrated else logits


def build(arch: str, class_names: list[str], image_shape: tuple[int, int, int], mean, std) -> Classifier:
    h, _, c = image_shape
    net = create_model(arch, in_channels=c, num_classes=len(class_names), image_size=h)
    return Classifier(net, list(mean), list(std))


def channel_stats(images_nhwc) -> tuple[list[float], list[float]]:
    """Per-channel mean and std in 0..1 units, computed in chunks over a (memory-mapped) uint8 array."""
    total = sq = 0.0
    n = 0
    for start in range(0, len(images_nhwc), 8192):
        chunk = torch.from_numpy(images_nhwc[start : start + 8192].astype("float32") / 255).flatten(0, 2)
        total = total + chunk.sum(0).double()
        sq = sq + (chunk.double() ** 2).sum(0)
        n += chunk.shape[0]
    mean = total / n
    std = (sq / n - mean**2).clamp_min(1e-12).sqrt()
    return mean.tolist(), std.tolist()


def normalisation(images_nhwc, private: bool) -> tuple[list[float], list[float]]:
    """The per-channel mean and std the model normalises with: the train images' (`channel_stats`), or under
    DP-SGD fixed values (0.5, 0.25), since statistics of the train images would leak outside the (ε, δ) budget."""
    if private:
        c = images_nhwc.shape[-1]
        return [0.5] * c, [0.25] * c
    return channel_stats(images_nhwc)


def save(path: Path, model: Classifier, arch: str, class_names: list[str], image_shape, **extra) -> None:
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    payload = {
        "arch": arch,
        "class_names": class_names,
        "image_shape": list(image_shape),
        "temperature": float(getattr(model, "temperature", 1.0)),
        "tta": getattr(model, "tta", "none"),
        "state_dict": state,
        **extra,
    }
    model_file.save(path, payload)


def load(path: Path | str, device: torch.device | str = "cpu") -> tuple[Classifier, dict]:
    """Rebuild a saved classifier in eval mode; also returns the saved metadata."""
    info = model_file.read(path, "classification")
    state = info.pop("state_dict")
    info.setdefault("temperature", 1.0)  # files written before the served rule was stored
    info.setdefault("tta", "none")
    if info["tta"] not in TTA_LEVELS or not float(info["temperature"]) > 0:
        raise ValueError(f"{path}: bad served rule (tta {info['tta']!r}, temperature {info['temperature']!r})")
    model = build(info["arch"], info["class_names"], tuple(info["image_shape"]), state["mean"].flatten(), state["std"].flatten())
    if info.get("privacy", {}).get("group_norm"):  # trained with DP-SGD: its batch norms became group norms
        from opacus.validators import ModuleValidator

        model = ModuleValidator.fix(model)
    model.load_state_dict(state)
    model.temperature, model.tta = float(info["temperature"]), info["tta"]
    return model.to(device).eval(), info


@torch.no_grad()
def predict_logits(
    model: nn.Module, images_nhwc, device: torch.device, batch_size: int = 1024, calibrated: bool = True
) -> Tensor:
    """Served logits for a uint8 N x H x W x C array (numpy or tensor), in batches, on the CPU: with the
    model's test-time augmentation, divided by its temperature (unless `calibrated=False`)."""
    served = Served(model.eval(), calibrated)
    out = []
    for start in range(0, len(images_nhwc), batch_size):
        chunk = torch.as_tensor(np.asarray(images_nhwc[start : start + batch_size]).copy()).to(device).permute(0, 3, 1, 2)
        out.append(served(chunk).float().cpu())
    return torch.cat(out) if out else torch.empty(0)
