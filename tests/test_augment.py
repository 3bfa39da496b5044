"""Batched augmentation: each op's semantics, mixing targets, determinism."""

import pytest
import torch

from visionops.config import AugmentConfig
from visionops.tasks.classification.augment import (
    BatchAugment,
    cutout,
    hflip,
    rotate,
    translate,
)

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])

SINGLE_OPS = {
    "hflip": {"hflip": True},
    "crop": {"crop_padding": 4},
    "rotate": {"rotate_degrees": 30},
    "cutout": {"cutout_size": 8},
    "randaugment": {"auto": "randaugment"},
    "trivialaugment": {"auto": "trivialaugment"},
    "mixup": {"mixup_alpha": 1.0},
    "cutmix": {"cutmix_alpha": 1.0},
}


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def batch(n=16, c=3, size=32, device="cpu"):
    return torch.rand(n, c, size, size, generator=gen(123)).to(device), torch.arange(n, device=device) % 10


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("op", SINGLE_OPS)
def test_single_op_preserves_shape_dtype_device_and_changes_batch(op, channels, device):
    images, labels = batch(c=channels, device=device)
    aug = BatchAugment(**SINGLE_OPS[op], num_classes=10)
    assert not aug.is_identity
    out, targets = aug.augment(images, labels, gen())
    assert (out.shape, out.dtype, out.device) == (images.shape, images.dtype, images.device)
    assert not torch.equal(out, images)
    assert targets.device == images.device
    if op in ("mixup", "cutmix"):
        assert targets.shape == (16, 10) and targets.dtype == torch.float32
    else:
        assert torch.equal(targets, labels)


def test_hflip_flips_exactly_the_masked_samples():
    images, _ = batch(8)
    mask = torch.tensor([1, 0, 0, 1, 1, 0, 1, 0], dtype=torch.bool)
    out = hflip(images, mask)
    assert torch.equal(out[mask], torch.flip(images[mask], dims=[-1]))
    assert torch.equal(out[~mask], images[~mask])


def test_random_hflip_is_per_sample():
    images, labels = batch(64)
    out, _ = BatchAugment(hflip=True).augment(images, labels, gen())
    flipped = torch.tensor([torch.equal(o, i.flip(-1)) for o, i in zip(out, images)])
    kept = torch.tensor([torch.equal(o, i) for o, i in zip(out, images)])
    assert (flipped ^ kept).all() and 0 < flipped.sum() < 64


@pytest.mark.parametrize("mode", ["reflect", "constant"])
def test_translate_matches_roll_in_the_interior(mode):
    images, _ = batch(3)
    shifts = torch.tensor([[2, -3], [0, 0], [-4, 4]])
    out = translate(images, shifts, padding=4, mode=mode)
    for o, i, (dy, dx) in zip(out, images, shifts.tolist()):
        assert torch.equal(o[:, 4:-4, 4:-4], torch.roll(i, (dy, dx), dims=(1, 2))[:, 4:-4, 4:-4])
    assert torch.equal(out[1], images[1])


def test_random_crop_moves_content_by_at_most_padding():
    p = 3
    images = torch.arange(32 * 32, dtype=torch.float32).view(1, 1, 32, 32).repeat(32, 1, 1, 1)
    out, _ = BatchAugment(crop_padding=p).augment(images, torch.zeros(32), gen())
    marker = images[0, 0, 16, 16]
    offsets = set()
    for o in out:
        ((y, x),) = (o[0] == marker).nonzero().tolist()
        assert abs(y - 16) <= p and abs(x - 16) <= p
        offsets.add((y, x))
    assert len(offsets) > 1


def test_rotate_by_90_degrees_equals_rot90():
    images, _ = batch(4)
    assert torch.allclose(rotate(images, torch.full((4,), 90.0)), torch.rot90(images, 1, dims=(2, 3)), atol=1e-5)
    assert torch.allclose(
        rotate(images, torch.full((4,), -90.0)), torch.rot90(images, -1, dims=(2, 3)), atol=1e-5
    )
    assert torch.allclose(rotate(images, torch.zeros(4)), images, atol=1e-5)


def test_rotate_uses_per_sample_angles():
    images, _ = batch(2)
    out = rotate(images, torch.tensor([0.0, 180.0]))
    assert torch.allclose(out[0], images[0], atol=1e-5)
    assert torch.allclose(out[1], images[1].flip(-1, -2), atol=1e-5)


def test_cutout_zeroes_a_clipped_square():
    images = torch.ones(3, 2, 16, 16)
    out = cutout(images, torch.tensor([[8, 8], [0, 0], [15, 10]]), size=6)
    expected = torch.ones(3, 16, 16)
    expected[0, 5:11, 5:11] = 0
    expected[1, 0:3, 0:3] = 0
    expected[2, 12:16, 7:13] = 0
    assert torch.equal(out, expected[:, None].expand_as(out))


def test_random_cutout_zeroes_one_square_per_sample():
    size = 8
    images = torch.ones(32, 1, 32, 32)
    out, _ = BatchAugment(cutout_size=size).augment(images, torch.zeros(32), gen())
    for o in out[:, 0]:
        rows, cols = (o == 0).any(1).nonzero(), (o == 0).any(0).nonzero()
        assert int((o == 0).sum()) == len(rows) * len(cols)  # a filled rectangle
        assert 0 < len(rows) <= size and 0 < len(cols) <= size
        if 0 < rows.min() and rows.max() < 31:
            assert len(rows) == size
        if 0 < cols.min() and cols.max() < 31:
            assert len(cols) == size


def test_mixup_targets_and_convex_images():
    images, labels = batch(10)  # labels 0..9: every neighbour has another class
    out, targets = BatchAugment(mixup_alpha=0.4, num_classes=10).augment(images, labels, gen())
    assert torch.allclose(targets.sum(1), torch.ones(10)) and (targets >= 0).all()
    lam = targets[torch.arange(10), labels]
    assert torch.allclose(targets[torch.arange(10), labels.roll(1)], 1 - lam)
    assert torch.allclose(
        out, lam.view(-1, 1, 1, 1) * images + (1 - lam.view(-1, 1, 1, 1)) * images.roll(1, 0), atol=1e-6
    )


def test_cutmix_pastes_a_box_and_weights_targets_by_area():
    images = torch.arange(1.0, 11.0).view(10, 1, 1, 1).expand(10, 3, 32, 32).contiguous()
    labels = torch.arange(10)
    out, targets = BatchAugment(cutmix_alpha=1.0, num_classes=10).augment(images, labels, gen())
    assert torch.allclose(targets.sum(1), torch.ones(10))
    own = (out == images).float().mean((1, 2, 3))
    assert ((out == images) | (out == images.roll(1, 0))).all()
    assert torch.allclose(targets[torch.arange(10), labels], own)


def test_both_mixers_are_used_when_both_alphas_are_set():
    images = torch.arange(1.0, 9.0).view(8, 1, 1, 1).expand(8, 1, 8, 8).contiguous()
    aug = BatchAugment(mixup_alpha=1.0, cutmix_alpha=1.0, num_classes=10)
    g, kinds = gen(), set()
    for _ in range(20):
        out, _ = aug.augment(images, torch.arange(8), g)
        kinds.add("cutmix" if ((out == images) | (out == images.roll(1, 0))).all() else "mixup")
    assert kinds == {"cutmix", "mixup"}


def test_same_seed_same_output():
    cfg = AugmentConfig(
        hflip=True,
        rotate_degrees=15,
        crop_padding=2,
        cutout_size=6,
        auto="trivialaugment",
        mixup_alpha=0.2,
        cutmix_alpha=1.0,
    )
    aug = BatchAugment.from_config(cfg, num_classes=10)
    images, labels = batch()
    a, ta = aug.augment(images, labels, gen(7))
    b, tb = aug.augment(images, labels, gen(7))
    c, _ = aug.augment(images, labels, gen(8))
    assert torch.equal(a, b) and torch.equal(ta, tb)
    assert not torch.equal(a, c)


def test_randaugment_respects_num_ops_from_config():
    aug = BatchAugment.from_config(
        AugmentConfig(auto="randaugment", randaugment_num_ops=3, randaugment_magnitude=5)
    )
    assert aug.num_ops == 3 and aug.policy.magnitude == 5


def test_identity_config_returns_input_unchanged():
    aug = BatchAugment.from_config(AugmentConfig())
    images, labels = batch()
    assert aug.is_identity
    out, targets = aug(images, labels, gen())
    assert out is images and targets is labels


def test_mixing_needs_num_classes():
    with pytest.raises(ValueError, match="num_classes"):
        BatchAugment.from_config(AugmentConfig(mixup_alpha=0.2))
