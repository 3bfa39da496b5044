"""Canonicalisation of single images: 16-bit greyscale is rescaled to 8 bits, not clipped."""

from __future__ import annotations

import numpy as np
from PIL import Image

from visionops.data.images import array_to_canonical, decode_file, to_canonical


def _scene() -> np.ndarray:
    """A 48x48 8-bit greyscale scene: a gradient, a bright disc and a dark bar."""
    yy, xx = np.mgrid[:48, :48]
    img = 40 + 3 * xx
    img[(yy - 20) ** 2 + (xx - 30) ** 2 < 100] = 230
    img[30:36, 5:40] = 10
    return img.astype(np.uint8)


def test_16bit_png_is_rescaled_not_white(tmp_path):
    scene = _scene()
    path = tmp_path / "scan.png"
    Image.fromarray(scene.astype(np.uint16) * 257).save(path)  # the same scene at 16 bits
    with Image.open(path) as img:
        assert img.mode == "I;16"
        assert np.asarray(img.convert("L")).min() == 255  # PIL alone clips it to solid white

    grey, orig = decode_file(path, 48, 1)
    assert orig == (48, 48, 1)
    np.testing.assert_array_equal(grey[..., 0], scene)
    rgb, _ = decode_file(path, 48, 3)
    np.testing.assert_array_equal(rgb, np.repeat(scene[..., None], 3, axis=-1))
    small, _ = decode_file(path, 24, 1)
    np.testing.assert_array_equal(small, to_canonical(Image.fromarray(scene), 24, 1))


def test_16bit_arrays_and_32bit_mode_are_rescaled():
    scene = _scene()
    wide = scene.astype(np.uint16) * 257
    np.testing.assert_array_equal(array_to_canonical(wide, 48, 1)[..., 0], scene)
    np.testing.assert_array_equal(array_to_canonical(wide.astype(">u2"), 48, 1)[..., 0], scene)
    as_int32 = Image.fromarray(wide.astype(np.int32))
    assert as_int32.mode == "I"
    np.testing.assert_array_equal(to_canonical(as_int32, 48, 1)[..., 0], scene)
    low = Image.fromarray(np.full((4, 4), 1000, np.uint16))  # a dark 16-bit value stays dark
    assert to_canonical(low, 4, 1).max() == 4


def test_8bit_images_are_unchanged(tmp_path):
    scene = _scene()
    Image.fromarray(scene).save(tmp_path / "a.png")
    np.testing.assert_array_equal(decode_file(tmp_path / "a.png", 48, 1)[0][..., 0], scene)
