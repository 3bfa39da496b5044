"""The segmentation loss with its hand-written gradient (`PixelLoss`) vs the same loss in autograd ops, and
likewise the distillation criterion (`PixelLoss.distill` vs `pixel_kd_loss` beside the hard loss).

Times, alternating in one process so that both see the same machine load: each loss's forward and backward
alone on a batch of bf16 channels-last logits, and a whole training step (bf16 autocast, channels-last,
fused AdamW, as the segmentation preset trains) of each U-Net with either loss, and of `unet_small`
distilled from a frozen `unet` (alpha 0.7, T 4, as the preset distils). Prints the medians and the ratios
(hand-written / autograd); below 1 is faster.

    python bench/bench_pixel_loss.py [--batch-size 16] [--image-size 64] [--classes 11] [--rounds 5] [--steps 10]
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch
from common import add_step_options, ms_per_call, train_step

from visionops.models import create_model
from visionops.tasks.segmentation.losses import PixelLoss, cross_entropy_dice_autograd, pixel_kd_loss
from visionops.tasks.segmentation.segmenter import IGNORE


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_step_options(ap)
    args = ap.parse_args()
    torch.manual_seed(0)
    n, k, side = args.batch_size, args.classes, args.image_size
    fused = PixelLoss([0.1] + [1.0] * (k - 1))
    losses = {"hand_written": fused, "autograd": lambda z, m: cross_entropy_dice_autograd(z, m, fused.weight)}
    masks = torch.randint(0, k, (n, side, side), dtype=torch.uint8)
    masks[:, : side // 16] = IGNORE  # as the augmentation's shifts bring in
    logits = torch.randn(n, k, side, side).to(torch.bfloat16).contiguous(memory_format=torch.channels_last)
    logits.requires_grad_()
    x = torch.rand(n, 1, side, side).contiguous(memory_format=torch.channels_last)

    teacher_net = create_model("unet", in_channels=1, num_classes=k, image_size=side).to(memory_format=torch.channels_last)
    teacher_net.eval().requires_grad_(False)
    alpha, t = 0.7, 4.0
    distills = {
        "hand_written": lambda z, m, teacher: fused.distill(z, m, teacher, alpha, t),
        "autograd": lambda z, m, teacher: (1 - alpha) * cross_entropy_dice_autograd(z, m, fused.weight)
        + alpha * pixel_kd_loss(z, teacher.float(), t, m, fused.weight),
    }
    teacher_logits = torch.randn(n, k, side, side).to(torch.bfloat16).contiguous(memory_format=torch.channels_last)

    def loss_only(loss_fn):
        def run():
            logits.grad = None
            loss_fn(logits, masks).backward()
        return run

    def step(arch: str, loss_fn):
        model = create_model(arch, in_channels=1, num_classes=k, image_size=side)
        return train_step(model, lambda: (x, masks), lambda z, m, _x: loss_fn(z, m))

    def with_teacher(distill_fn):
        def loss_fn(z, m):
            with torch.no_grad():
                teacher = teacher_net(x)
            return distill_fn(z, m, teacher)
        return loss_fn

    cases = {"loss": {name: loss_only(fn) for name, fn in losses.items()},
             "distill_loss": {name: loss_only(lambda z, m, fn=fn: fn(z, m, teacher_logits)) for name, fn in distills.items()}}
    for arch in ("unet", "unet_small"):
        cases[f"{arch}_step"] = {name: step(arch, fn) for name, fn in losses.items()}
    cases["unet_small_distill_step"] = {name: step("unet_small", with_teacher(fn)) for name, fn in distills.items()}
    times = {case: {name: [] for name in runs} for case, runs in cases.items()}
    for case, runs in cases.items():
        for run in runs.values():  # warm-up
            ms_per_call(run, 3)
    for _ in range(args.rounds):
        for case, runs in cases.items():
            for name, run in runs.items():
                times[case][name].append(ms_per_call(run, args.steps))
    out = {"batch": [n, k, side, side], "threads": torch.get_num_threads()}
    for case, by_name in times.items():
        med = {name: statistics.median(t) for name, t in by_name.items()}
        out[case] = {"ms_median": {name: round(v, 2) for name, v in med.items()},
                     "ratio": round(med["hand_written"] / med["autograd"], 3)}
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
