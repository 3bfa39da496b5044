"""Segmentation's pixel loss (`PixelLoss`, with its hand-written gradient) against its specification in
autograd ops (`cross_entropy_dice_autograd`, and `pixel_kd_loss` for `PixelLoss.distill`): the same loss and
the same gradient, in the logits' dtype and memory layout."""

from __future__ import annotations

import pytest
import torch

from visionops.tasks.segmentation.losses import PixelLoss, cross_entropy_dice_autograd, pixel_kd_loss
from visionops.tasks.segmentation.segmenter import IGNORE


def _batch(ignored: bool, dtype: torch.dtype, channels_last: bool):
    gen = torch.Generator().manual_seed(0)
    logits = (torch.randn(3, 5, 8, 6, generator=gen) * 3).to(dtype)
    if channels_last:
        logits = logits.contiguous(memory_format=torch.channels_last)
    masks = torch.randint(0, 5, (3, 8, 6), generator=gen, dtype=torch.uint8)
    if ignored:
        masks[:, :2] = IGNORE
        masks[1, :, 4:] = IGNORE
    return logits, masks


@pytest.mark.parametrize("weights", [None, [0.2, 1.0, 2.0, 0.5, 3.0]])
@pytest.mark.parametrize("dice", [0.0, 1.0, 0.5])
@pytest.mark.parametrize("ignored", [False, True])
@pytest.mark.parametrize(("dtype", "channels_last"), [(torch.float32, False), (torch.bfloat16, True)])
def test_pixel_loss_matches_its_autograd_specification(weights, dice, ignored, dtype, channels_last):
    logits, masks = _batch(ignored, dtype, channels_last)
    loss_fn = PixelLoss(weights, dice=dice)
    ours, spec = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    got, want = loss_fn(ours, masks), cross_entropy_dice_autograd(spec, masks, loss_fn.weight, dice)
    (got * 2.5).backward()  # an upstream gradient other than 1
    (want * 2.5).backward()
    assert got.item() == pytest.approx(want.item(), rel=1e-5)
    assert ours.grad.dtype == dtype and ours.grad.is_contiguous(memory_format=torch.channels_last) == channels_last
    tol = {"atol": 1e-7, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 1e-4, "rtol": 1e-2}
    torch.testing.assert_close(ours.grad.float(), spec.grad.float(), **tol)
    assert ours.grad.abs().sum() > 0


@pytest.mark.parametrize("weights", [None, [0.2, 1.0, 2.0, 0.5, 3.0]])
@pytest.mark.parametrize("alpha", [0.7, 1.0])
@pytest.mark.parametrize("ignored", [False, True])
@pytest.mark.parametrize(("dtype", "channels_last"), [(torch.float32, False), (torch.bfloat16, True)])
def test_distillation_loss_matches_its_autograd_specification(weights, alpha, ignored, dtype, channels_last):
    logits, masks = _batch(ignored, dtype, channels_last)
    teacher = (torch.randn(logits.shape, generator=torch.Generator().manual_seed(1)) * 3).to(dtype)
    teacher = teacher.contiguous(memory_format=torch.channels_last) if channels_last else teacher
    loss_fn, t = PixelLoss(weights), 3.0
    ours, spec = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    got = loss_fn.distill(ours, masks, teacher, alpha, t)
    want = (1 - alpha) * cross_entropy_dice_autograd(spec, masks, loss_fn.weight) + alpha * pixel_kd_loss(
        spec, teacher, t, masks, loss_fn.weight)
    (got * 2.5).backward()
    (want * 2.5).backward()
    assert got.item() == pytest.approx(want.item(), rel=1e-5)
    assert ours.grad.dtype == dtype and ours.grad.is_contiguous(memory_format=torch.channels_last) == channels_last
    tol = {"atol": 1e-7, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 1e-4, "rtol": 1e-2}
    torch.testing.assert_close(ours.grad.float(), spec.grad.float(), **tol)
    assert ours.grad.abs().sum() > 0


def test_pixel_loss_of_an_all_ignored_batch_is_zero_with_zero_gradient():
    logits, masks = _batch(False, torch.float32, False)
    logits.requires_grad_()
    loss = PixelLoss([1.0] * 5)(logits, torch.full_like(masks, IGNORE))
    loss.backward()
    assert loss.item() == 0.0 and not logits.grad.any()


def test_dice_term_is_near_zero_for_confident_right_logits_and_skips_ignored_pixels():
    masks = torch.tensor([[[0, 1], [2, 255]]], dtype=torch.uint8)
    right = torch.nn.functional.one_hot(masks.long().clamp(max=2), 3).permute(0, 3, 1, 2).float() * 50
    wrong = right.roll(1, dims=1)
    assert PixelLoss(dice=1.0)(right, masks) < 0.01
    dice_term = PixelLoss(dice=1.0)(wrong, masks) - PixelLoss(dice=0.0)(wrong, masks)
    assert dice_term.item() == pytest.approx(1 - 1 / 3, abs=1e-4)  # no overlap: 1 - 1/3 per class with the +1 smoothing
