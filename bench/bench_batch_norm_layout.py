"""`models.layers.BatchNorm2d` (few channels train in the contiguous layout) vs torch's own batch norm.

Times, alternating in one process so that every variant sees the same machine load:
- a training step of each U-Net as the segmentation preset trains it (bf16 autocast, channels-last, fused
  AdamW, its `PixelLoss`), with the U-Net's batch norms running torch's forward ("torch") or ours ("ours");
- a fp32 forward pass (eval mode, the served path's setting) with torch's batch norm, with ours, and with
  ours switching layouts in eval mode too ("ours_in_eval"), the variant that was dropped.
Prints the medians in ms and the ratios to "torch"; below 1 is faster.

    python bench/bench_batch_norm_layout.py [--batch-size 16] [--image-size 64] [--classes 11] [--rounds 5] [--steps 10]
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch
from common import add_step_options, ms_per_call, train_step
from torch import nn

from visionops.models import create_model, layers
from visionops.tasks.segmentation.losses import PixelLoss

OURS = layers.BatchNorm2d.forward


def _in_eval_too(self, x):
    return nn.BatchNorm2d.forward(self, x.contiguous() if x.shape[1] < 16 and not x.is_contiguous() else x)


VARIANTS = {"torch": nn.BatchNorm2d.forward, "ours": OURS, "ours_in_eval": _in_eval_too}


def _alternate(calls: dict, rounds: int, steps: int) -> dict:
    """Median ms of each (variant, call) pair, the variants' order reversed every other round."""
    times = {name: [] for name in calls}
    for name, (variant, fn) in calls.items():  # warm-up
        layers.BatchNorm2d.forward = VARIANTS[variant]
        ms_per_call(fn, 3)
    for r in range(rounds):
        for name in calls if r % 2 == 0 else reversed(list(calls)):
            variant, fn = calls[name]
            layers.BatchNorm2d.forward = VARIANTS[variant]
            times[name].append(ms_per_call(fn, steps))
    layers.BatchNorm2d.forward = OURS
    return {name: statistics.median(t) for name, t in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_step_options(ap)
    args = ap.parse_args()
    results = {}
    for arch in ("unet", "unet_small"):
        torch.manual_seed(0)
        model = create_model(arch, in_channels=1, num_classes=args.classes, image_size=args.image_size)
        loss_fn = PixelLoss([0.1] + [1.0] * (args.classes - 1))
        shape = (args.batch_size, 1, args.image_size, args.image_size)
        x = torch.rand(shape).contiguous(memory_format=torch.channels_last)
        y = torch.randint(0, args.classes, (args.batch_size, args.image_size, args.image_size), dtype=torch.uint8)
        # the served path's input: fp32, a uint8 NHWC batch permuted to N x 1 x H x W
        served = torch.rand(args.batch_size * 4, args.image_size, args.image_size, 1).permute(0, 3, 1, 2)
        step = train_step(model, lambda: (x, y), lambda z, m, _x: loss_fn(z, m))

        @torch.no_grad()
        def forward():
            model.eval()
            model(served)

        train = _alternate({v: (v, step) for v in ("torch", "ours")}, args.rounds, args.steps)
        infer = _alternate({v: (v, forward) for v in VARIANTS}, args.rounds, args.steps)
        results[arch] = {
            "train_step_ms": {k: round(v, 2) for k, v in train.items()},
            "train_ratio_ours_to_torch": round(train["ours"] / train["torch"], 3),
            f"eval_forward_ms_batch_{args.batch_size * 4}": {k: round(v, 2) for k, v in infer.items()},
            "eval_ratio_to_torch": {k: round(v / infer["torch"], 3) for k, v in infer.items()},
        }
    print(json.dumps({"threads": torch.get_num_threads(), "batch_size": args.batch_size, **results}, indent=2))


if __name__ == "__main__":
    main()
