"""The pieces of the fastnet (airbench) recipe: whitening stem, optimizer groups, triangle schedule,
lookahead (and its exact resume), test-time augmentation, and the preset itself."""

from itertools import pairwise
from pathlib import Path

import pytest
import torch
from torch import nn

from visionops.config import AugmentConfig, TrainConfig, load_params
from visionops.models import create_model
from visionops.models.fastnet import Whitening
from visionops.tasks.classification import classifier
from visionops.tasks.classification.augment import BatchAugment
from visionops.tasks.classification.losses import ClassificationLoss
from visionops.tasks.classification.objective import val_scorer
from visionops.tasks.classification.tta import tta_logits
from visionops.training.lookahead import Lookahead
from visionops.training.trainer import _optimizer, fit, init_from_data, triangle

ROOT = Path(__file__).resolve().parents[1]


def test_whitening_makes_patch_covariance_identity():
    torch.manual_seed(0)
    mix = torch.randn(3, 3)
    x = torch.einsum("ij,njhw->nihw", mix, torch.randn(256, 3, 12, 12)) + 0.5  # correlated channels
    layer = Whitening(3, eps=0.0)
    assert layer.out_channels == 24 and not layer.weight.requires_grad and layer.bias.requires_grad
    layer.init_from_data(x)
    with torch.no_grad():
        out = nn.functional.conv2d(x, layer.weight[:12]).permute(0, 2, 3, 1).reshape(-1, 12)
    second_moment = out.T @ out / len(out)  # airbench whitens the raw (uncentred) patch moments
    assert torch.allclose(second_moment, torch.eye(12), atol=1e-3)
    assert torch.equal(layer.weight[12:], -layer.weight[:12])


def test_init_from_data_feeds_the_stem_its_real_inputs():
    torch.manual_seed(0)
    model = classifier.build("fastnet", [str(i) for i in range(10)], (16, 16, 3), [0.5] * 3, [0.25] * 3)
    images = torch.randint(0, 256, (64, 3, 16, 16), dtype=torch.uint8)
    stem = model.net[0]
    init_from_data(model, images, sample=32, seed=0)
    idx = torch.randperm(64, generator=torch.Generator().manual_seed(0))[:32]
    expected = Whitening(3)
    expected.init_from_data((images[idx].float() / 255 - 0.5) / 0.25)  # normalised as the model does
    assert torch.allclose(stem.weight, expected.weight, atol=1e-5)
    assert not stem._forward_pre_hooks  # the capture hook is removed


def test_optimizer_groups_scale_norm_lr_and_skip_frozen():
    model = create_model("fastnet", in_channels=3, num_classes=10, image_size=32)
    opt = _optimizer(model, TrainConfig(lr=0.5, weight_decay=1e-3, norm_lr_scale=64))
    by_lr = {g["lr"]: g for g in opt.param_groups}
    norm_biases = [m.bias for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert {id(p) for p in by_lr[32.0]["params"]} == {id(p) for p in norm_biases}
    assert by_lr[32.0]["weight_decay"] == 0.0 and by_lr[0.5]["weight_decay"] in (0.0, 1e-3)
    in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
    frozen = [p for p in model.parameters() if not p.requires_grad]
    assert frozen and not in_opt & {id(p) for p in frozen}  # the whitening filters and BN scales
    assert in_opt == {id(p) for p in model.parameters() if p.requires_grad}


def test_triangle_schedule_shape():
    total = 100
    values = [triangle(s, total) for s in range(total + 1)]
    assert values[0] == pytest.approx(0.2) and max(values) == pytest.approx(1.0)
    assert values.index(max(values)) == 23 and values[-1] == pytest.approx(0.07)
    rising, falling = list(pairwise(values[:24])), list(pairwise(values[23:]))
    assert all(a <= b for a, b in rising) and all(a >= b for a, b in falling)


def test_lookahead_averages_toward_the_live_weights():
    lin = nn.Linear(2, 1, bias=False)
    la = Lookahead(lin, total_steps=10, start=0.0, every=1, decay=0.5, power=0.0)
    with torch.no_grad():
        lin.weight.fill_(1.0)
    la.step(1)  # first call snapshots
    with torch.no_grad():
        lin.weight.fill_(3.0)
    la.step(2)  # ema = lerp(1, 3, 1 - 0.5) = 2, and the live weights are reset to it
    assert torch.allclose(lin.weight, torch.full_like(lin.weight, 2.0))
    la.step(3)
    assert torch.allclose(lin.weight, torch.full_like(lin.weight, 2.0))


def test_tta_levels():
    model = nn.Conv2d(1, 1, 3, padding=1, bias=False)
    x = torch.randn(2, 1, 6, 6)
    with torch.no_grad():
        assert torch.equal(tta_logits(model, x, "none"), model(x))
        assert torch.allclose(tta_logits(model, x, "flip"), 0.5 * (model(x) + model(x.flip(-1))))
        sym = nn.Identity()
        flat = torch.ones(2, 1, 6, 6)  # every view of a constant image is the same
        assert torch.allclose(tta_logits(sym, flat, "flip_translate"), flat)


def _recipe_cfg(**kw) -> TrainConfig:
    base = {"model": "fastnet", "epochs": 3, "batch_size": 32, "lr": 0.2, "momentum": 0.85, "schedule": "triangle",
            "norm_lr_scale": 8, "lookahead": True, "tta": "flip_translate", "label_smoothing": 0.2}
    return TrainConfig(**{**base, **kw})


def _data(n: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 4
    x = torch.randint(0, 60, (n, 3, 16, 16), generator=g, dtype=torch.uint8)
    x[torch.arange(n), y % 3, :8] += 150  # a class-dependent colour in the top half
    x[y >= 2, :, 8:] += 40
    return x, y


def test_fastnet_recipe_trains_and_resumes_exactly(tmp_path):
    train, val = _data(256), _data(64, seed=1)
    loss = ClassificationLoss(0.2)
    augment = BatchAugment.from_config(AugmentConfig(hflip=True, crop_padding=2))
    criterion = lambda logits, targets, _x: loss(logits, targets)

    def build():
        torch.manual_seed(0)
        return classifier.build("fastnet", list("abcd"), (16, 16, 3), [0.3] * 3, [0.2] * 3)

    cpu = torch.device("cpu")
    scorer = val_scorer(val, _recipe_cfg(), cpu)
    full, state = fit(build(), train, scorer, _recipe_cfg(), augment, criterion, cpu)
    assert state.best_acc > 0.8 and all("epoch_train_seconds" in row for row in state.history)
    # Two epochs, then a "restart" from the checkpoint for the third: the same weights as one run.
    ckpt = tmp_path / "ck.pt"
    with pytest.raises(_Stop):
        fit(build(), train, scorer, _recipe_cfg(), augment, criterion, cpu, checkpoint=ckpt, fingerprint="x",
            on_epoch=lambda _d, row: _stop_after(row, 2))
    resumed, resumed_state = fit(build(), train, scorer, _recipe_cfg(), augment, criterion, cpu, checkpoint=ckpt, fingerprint="x")
    assert [r["train_loss"] for r in resumed_state.history] == [r["train_loss"] for r in state.history]
    for a, b in zip(full.state_dict().values(), resumed.state_dict().values()):
        assert torch.equal(a, b)


class _Stop(Exception):
    pass


def _stop_after(row: dict, epoch: int) -> None:
    if row["epoch"] == epoch:
        raise _Stop


def test_preset_is_a_valid_params_file():
    params = load_params(ROOT / "presets" / "cifar10-fastnet.yaml")
    assert params.train.model == "fastnet" and params.train.schedule == "triangle" and params.train.lookahead
    assert params.distill.student == "fastnet_tiny"
    kw = {"in_channels": 3, "num_classes": 10, "image_size": 32}
    teacher, student = create_model("fastnet", **kw), create_model("fastnet_tiny", **kw)
    ratio = sum(p.numel() for p in student.parameters()) / sum(p.numel() for p in teacher.parameters())
    assert ratio < 0.1
