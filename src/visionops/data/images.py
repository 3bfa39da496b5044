"""Decoding and resizing single images into the canonical uint8 H x W x C form."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
from PIL import Image

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg"}


WIDE_MODES = {"I", "I;16", "I;16L", "I;16B", "I;16N"}  # 16-bit greyscale as PIL decodes it (PNG: "I;16")


def to_8bit(img: Image.Image) -> Image.Image:
    """Rescale 16-bit greyscale to "L" (0..65535 -> 0..255, rounded); PIL's own convert clips at 255.

    Mode "I" (32-bit) is read as 16-bit data, which is what PNG decoding gives; values outside
    0..65535 are clipped. Other modes are returned unchanged.
    """
    if img.mode not in WIDE_MODES:
        return img
    wide = np.clip(np.asarray(img).astype(np.int64), 0, 65535)
    return Image.fromarray(((wide * 255 + 32767) // 65535).astype(np.uint8), mode="L")


def to_canonical(img: Image.Image, image_size: int, channels: int) -> np.ndarray:
    """Convert to greyscale or RGB (16-bit rescaled) and resize to a square `image_size` (antialiased)."""
    img = to_8bit(img).convert("L" if channels == 1 else "RGB")
    if img.size != (image_size, image_size):
        img = img.resize((image_size, image_size), Image.Resampling.BILINEAR)
    arr = np.asarray(img, dtype=np.uint8)
    return arr[:, :, None] if channels == 1 else arr


def array_to_canonical(arr: np.ndarray, image_size: int, channels: int) -> np.ndarray:
    """Canonicalise an H x W (x C) uint8 array (or an H x W uint16 one, rescaled)."""
    img = Image.fromarray(arr.squeeze(-1) if arr.ndim == 3 and arr.shape[-1] == 1 else arr)
    return to_canonical(img, image_size, channels)


def decode_file(path: Path | str, image_size: int, channels: int) -> tuple[np.ndarray, tuple[int, int, int]]:
    """Fully decode an image file; raise OSError/ValueError for truncated or corrupt files."""
    with Image.open(path) as img:
        img.load()
        orig = (img.height, img.width, len(img.getbands()))
        return to_canonical(img, image_size, channels), orig


def file_hash(path: Path | str) -> str:
    """A digest of a file's bytes: the image's identity whatever the settings or the decoder's version."""
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, lambda: hashlib.blake2b(digest_size=16)).hexdigest()


def content_hash(arr: np.ndarray) -> str:
    """A digest of the canonical pixels: equal for exact duplicates, whatever their file names."""
    return hashlib.blake2b(np.ascontiguousarray(arr).tobytes(), digest_size=16).hexdigest()
