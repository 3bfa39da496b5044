"""Device choice, the per-device speed settings (autocast, memory format), and moving data onto the device."""

from __future__ import annotations

import contextlib

import numpy as np
import torch

from visionops.errors import InvalidInputError


def select_device(requested: str = "auto") -> torch.device:
    """`auto` picks cuda, then mps, then cpu; an explicit device that is missing is an error."""
    available = {
        "cuda": torch.cuda.is_available(),
        "mps": getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available(),
        "cpu": True,
    }
    if requested == "auto":
        return torch.device(next(name for name in ("cuda", "mps", "cpu") if available[name]))
    if not available.get(requested, False):
        raise InvalidInputError(f"train.device: '{requested}' is not available on this machine")
    return torch.device(requested)


def _applies(mode: str, device: torch.device) -> bool:
    """Whether a `train.amp` / `train.channels_last` setting ("cuda", "always", "off") is on for `device`."""
    return mode == "always" or (mode == "cuda" and device.type == "cuda")


def autocast(device: torch.device, mode: str):
    """bf16 autocast where `mode` applies (on CUDA fp16 where bf16 is unsupported); otherwise a no-op."""
    if not _applies(mode, device) or device.type not in ("cuda", "cpu"):
        return contextlib.nullcontext()
    if device.type == "cpu":
        return torch.autocast("cpu", dtype=torch.bfloat16)
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.autocast("cuda", dtype=dtype)


def memory_format(device: torch.device, mode: str) -> torch.memory_format:
    """channels_last where `mode` applies (see `config.SpeedSwitch`), else the default layout."""
    return torch.channels_last if _applies(mode, device) else torch.contiguous_format


def to_device(images_nhwc: np.ndarray, labels: np.ndarray, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 N x H x W x C numpy → uint8 N x C x H x W tensor on the device (kept there for all epochs)."""
    x = torch.from_numpy(np.array(images_nhwc)).permute(0, 3, 1, 2).contiguous()
    return x.to(device), torch.from_numpy(np.asarray(labels, dtype=np.int64)).to(device)
