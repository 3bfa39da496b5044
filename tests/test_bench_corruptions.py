"""The drift benchmark's shifts (bench/corruptions.py): each severity changes an image more than the one
below it, each corruption moves the image summary the inference log records the way it should, and the
windows are drawn as stated."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from corruptions import CORRUPTIONS, corrupt, prior_shift_window, sample_window
from scipy import ndimage


def images(n: int = 16, size: int = 32, seed: int = 0) -> np.ndarray:
    """uint8 N x H x W x 3 images with edges, mid-range colours and some texture, as photos have."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    out = np.empty((n, size, size, 3), dtype=np.float64)
    for i in range(n):
        base = 60 + 120 * (rng.uniform(0.3, 1) * xx[..., None] + rng.uniform(0, 0.4, 3) * yy[..., None])
        y0, x0 = rng.integers(2, size // 2, 2)
        base[y0:y0 + size // 3, x0:x0 + size // 3] = rng.uniform(20, 235, 3)
        out[i] = base + rng.normal(0, 6, (size, size, 3))
    return np.clip(out, 0, 255).round().astype(np.uint8)


def blur_measure(batch: np.ndarray) -> float:
    """Mean variance of the Laplacian of the grey images (the log's `blur`: low when blurred)."""
    grey = batch.astype(np.float64).mean(axis=3)
    return float(np.mean([ndimage.laplace(g).var() for g in grey]))


@pytest.mark.parametrize("name", CORRUPTIONS)
def test_each_severity_changes_the_images_more(name):
    original = images()
    change = [np.abs(corrupt(original, name, s).astype(np.int16) - original).mean() for s in range(1, 6)]
    assert change[0] > 0.5, f"{name} severity 1 barely changes the images ({change[0]:.3f} grey levels)"
    assert all(b > a for a, b in zip(change, change[1:])), f"{name}: change per severity {change} is not increasing"


def test_corruptions_move_the_logged_summaries_their_way():
    original = images()
    def contrast(batch):  # the log's `contrast`: each image's standard deviation
        return batch.reshape(len(batch), -1).std(axis=1).mean()

    sharp, mean = blur_measure(original), original.mean()
    assert blur_measure(corrupt(original, "gaussian_noise", 3)) > 1.5 * sharp
    assert blur_measure(corrupt(original, "gaussian_blur", 3)) < 0.5 * sharp
    assert corrupt(original, "brightness", 3).mean() > mean + 20
    assert contrast(corrupt(original, "contrast", 3)) < 0.5 * contrast(original)
    assert abs(corrupt(original, "contrast", 3).mean() - mean) < 3  # contrast keeps the mean grey


def test_corruptions_keep_shape_and_dtype_and_noise_follows_its_seed():
    original = images(4)
    for name in CORRUPTIONS:
        out = corrupt(original, name, 5)
        assert out.shape == original.shape and out.dtype == np.uint8
    state = torch.random.get_rng_state()
    a, b = corrupt(original, "gaussian_noise", 2, seed=1), corrupt(original, "gaussian_noise", 2, seed=1)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, corrupt(original, "gaussian_noise", 2, seed=2))
    assert torch.equal(state, torch.random.get_rng_state())  # the caller's random stream is untouched


def test_unknown_corruption_and_severity_are_refused():
    with pytest.raises(ValueError, match="unknown corruption 'fog'"):
        corrupt(images(1), "fog", 1)
    with pytest.raises(ValueError, match="severity 6"):
        corrupt(images(1), "jpeg", 6)


def test_windows_draw_distinct_images_and_the_prior_shift_puts_half_in_two_classes():
    labels = np.repeat(np.arange(10), 400)
    rng = np.random.default_rng(0)
    plain = sample_window(labels, 500, rng)
    assert len(set(plain.tolist())) == 500
    assert np.bincount(labels[plain], minlength=10).max() < 500 * 0.2  # about 10% each
    chosen_pairs = set()
    for _ in range(5):
        window = prior_shift_window(labels, 500, rng)
        assert len(set(window.tolist())) == 500
        counts = np.bincount(labels[window], minlength=10)
        top = np.argsort(counts)[-2:]
        assert counts[top].sum() == 250 and counts.min() > 0
        chosen_pairs.add(tuple(sorted(top.tolist())))
    assert len(chosen_pairs) > 1  # the shifted classes differ between windows
