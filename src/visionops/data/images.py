"""Decoding and resizing single images into the canonical uint8 H x W x C form."""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

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


RESIZES = ("squash", "letterbox")  # data.resize


@dataclass(frozen=True)
class Placement:
    """Where a source image of `source` (width, height) lies in the square canonical image: resized to
    `size` (width, height) with its top-left corner at `offset` (x, y). squash fills the square; letterbox
    keeps the aspect ratio and centres the image, the rest padded (black pixels; IGNORE in masks)."""

    source: tuple[int, int]
    size: tuple[int, int]
    offset: tuple[int, int]

    def boxes_to_canonical(self, boxes: np.ndarray) -> np.ndarray:
        """xyxy boxes in source pixels -> canonical pixels."""
        return np.asarray(boxes, np.float64) * self._scale() + self._shift()

    def boxes_to_source(self, boxes: np.ndarray) -> np.ndarray:
        """xyxy boxes in canonical pixels -> source pixels (the inverse of `boxes_to_canonical`)."""
        return (np.asarray(boxes, np.float64) - self._shift()) / self._scale()

    def crop(self, canonical: np.ndarray) -> np.ndarray:
        """The part of a canonical H x W (x ...) array that shows the source image (all of it for squash)."""
        (x, y), (w, h) = self.offset, self.size
        return canonical[y : y + h, x : x + w]

    def _scale(self) -> np.ndarray:
        sx, sy = self.size[0] / self.source[0], self.size[1] / self.source[1]
        return np.array([sx, sy, sx, sy], np.float64)

    def _shift(self) -> np.ndarray:
        x, y = self.offset
        return np.array([x, y, x, y], np.float64)


def placement(width: int, height: int, image_size: int, resize: str = "squash") -> Placement:
    """The `Placement` of a width x height source image in the image_size square under data.resize `resize`."""
    if resize == "squash":
        return Placement((width, height), (image_size, image_size), (0, 0))
    if resize != "letterbox":
        raise ValueError(f"data.resize must be one of {', '.join(RESIZES)}, got {resize!r}")
    scale = image_size / max(width, height)
    w, h = max(1, min(image_size, round(width * scale))), max(1, min(image_size, round(height * scale)))
    return Placement((width, height), (w, h), ((image_size - w) // 2, (image_size - h) // 2))


def place(img: Image.Image, image_size: int, resample: Image.Resampling, resize: str, fill: int = 0) -> Image.Image:
    """`img` resized (`resample`) into the image_size square as `placement` says, padded with `fill`."""
    p = placement(img.width, img.height, image_size, resize)
    if p.size != img.size:
        img = img.resize(p.size, resample)
    if p.size == (image_size, image_size):
        return img
    square = Image.new(img.mode, (image_size, image_size), fill)
    square.paste(img, p.offset)
    return square


def to_canonical(img: Image.Image, image_size: int, channels: int, resize: str = "squash") -> np.ndarray:
    """Convert to greyscale or RGB (16-bit rescaled) and resize to a square `image_size` (antialiased), squashed
    or letterboxed (`placement`)."""
    img = place(to_8bit(img).convert("L" if channels == 1 else "RGB"), image_size, Image.Resampling.BILINEAR, resize)
    arr = np.asarray(img, dtype=np.uint8)
    return arr[:, :, None] if channels == 1 else arr


def array_to_canonical(arr: np.ndarray, image_size: int, channels: int, resize: str = "squash") -> np.ndarray:
    """Canonicalise an H x W (x C) uint8 array (or an H x W uint16 one, rescaled)."""
    img = Image.fromarray(arr.squeeze(-1) if arr.ndim == 3 and arr.shape[-1] == 1 else arr)
    return to_canonical(img, image_size, channels, resize)


def open_image(data: bytes, name: Path | str) -> Image.Image:
    """PIL's image of a file's bytes; an unrecognised format raises UnidentifiedImageError naming `name`."""
    try:
        return Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise UnidentifiedImageError(f"cannot identify image file {str(name)!r}") from None


def decode_bytes(data: bytes, name: Path | str, image_size: int, channels: int,
                 resize: str = "squash") -> tuple[np.ndarray, tuple[int, int, int]]:
    """Fully decode the bytes of the image file `name`; raise OSError/ValueError for truncated or corrupt files."""
    with open_image(data, name) as img:
        return decode_image(img, image_size, channels, resize)


def decode_image(img: Image.Image, image_size: int, channels: int, resize: str = "squash") -> tuple[np.ndarray, tuple[int, int, int]]:
    """Load an opened image fully: its canonical pixels and its source shape (height, width, bands)."""
    img.load()
    return to_canonical(img, image_size, channels, resize), (img.height, img.width, len(img.getbands()))


def decode_file(path: Path | str, image_size: int, channels: int,
                resize: str = "squash") -> tuple[np.ndarray, tuple[int, int, int]]:
    """Fully decode an image file; raise OSError/ValueError for truncated or corrupt files."""
    return decode_bytes(Path(path).read_bytes(), path, image_size, channels, resize)


@dataclass(frozen=True)
class SourceImage:
    """A source file read once: its canonical pixels and source shape, two digests of the same bytes and the
    perceptual hash of its source pixels."""

    image: np.ndarray
    orig: tuple[int, int, int]
    identity: str  # `bytes_hash`: where the split puts the image (`Split.identities`)
    sha256: str  # recorded in the manifest, so that a file changed under its name is found (`data.changes`)
    near_hash: str = ""  # data.near_duplicate_hash of the image at source resolution ("" for "none")


def read_source_image(path: Path | str, image_size: int, channels: int, resize: str = "squash",
                      near_hash: str = "none") -> SourceImage:
    """Read `path` once, take its digests, decode it (errors as `decode_bytes`) and hash it with `near_hash`
    (`visionops.data.neardup.HASHES`) on its source pixels, before resizing."""
    from visionops.data.neardup import perceptual_hash  # (with scipy: only sources of files need it)

    data = Path(path).read_bytes()
    with open_image(data, path) as img:
        image, orig = decode_image(img, image_size, channels, resize)
        near = perceptual_hash(img, near_hash)
    return SourceImage(image, orig, bytes_hash(data), hashlib.sha256(data).hexdigest(), near)


def bytes_hash(data: bytes) -> str:
    """A digest of a file's bytes: the image's identity whatever the settings or the decoder's version."""
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def file_hash(path: Path | str) -> str:
    """`bytes_hash` of the file at `path`."""
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, lambda: hashlib.blake2b(digest_size=16)).hexdigest()


def content_hash(arr: np.ndarray) -> str:
    """A digest of the canonical pixels: equal for exact duplicates, whatever their file names."""
    return hashlib.blake2b(np.ascontiguousarray(arr).tobytes(), digest_size=16).hexdigest()
