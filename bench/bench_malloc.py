"""`process_settings.tune_malloc` (glibc keeps freed memory for reuse) vs glibc's default, on training steps.

malloc's settings hold for a whole process, so each variant runs in its own child process, the two
alternating, round after round, so that both see the same machine load. Each child times, after a warm-up:
- `cls_step`: a training step of classification's preset (`resnet20`, batch 128, 16 x 16 greyscale digits);
- `seg_teacher_step`: a step of the segmentation teacher (`unet`, batch 16, 64 x 64, the preset's
  `MaskAugment`, bf16 autocast, channels-last, fused AdamW, `PixelLoss`), as the preset trains it;
- `seg_distill_step`: a step of the segmentation student (`unet_small`) distilled from a frozen `unet`
  (`PixelLoss.distill`), as `distill` runs it.
Prints each variant's median ms per step and the ratios tuned / default; below 1 is faster.

    python bench/bench_malloc.py [--rounds 4] [--steps 20]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys

from common import ms_per_call, train_step

CHILD = "--child"


def child(tuned: bool, steps: int) -> dict:
    from visionops.process_settings import tune_malloc

    if tuned and not tune_malloc():
        raise SystemExit("tune_malloc() did not take its settings here (not glibc, or MALLOC_* set)")
    import torch
    from torch.nn import functional as F

    from visionops.models import create_model
    from visionops.tasks.segmentation.augment import MaskAugment
    from visionops.tasks.segmentation.losses import PixelLoss

    cl = torch.channels_last
    torch.manual_seed(0)

    k, side = 11, 64
    images = torch.randint(0, 256, (16, 1, side, side), dtype=torch.uint8)
    masks = torch.randint(0, k, (16, side, side), dtype=torch.uint8)
    augment, gen = MaskAugment(scale_jitter=0.1, translate=0.0625, brightness=0.2), torch.Generator().manual_seed(0)
    hard = PixelLoss([0.1] + [1.0] * (k - 1))
    teacher = create_model("unet", in_channels=1, num_classes=k, image_size=side).to(memory_format=cl).eval()

    def seg_batch():
        x, y = augment(images.float().div_(255), masks, gen)
        return x.contiguous(memory_format=cl), y

    def distill_loss(logits, y, x):
        with torch.no_grad():
            t = teacher(x)
        return hard.distill(logits, y, t, 0.7, 4.0)

    cls_x, cls_y = torch.rand(128, 1, 16, 16).contiguous(memory_format=cl), torch.randint(0, 10, (128,))
    cases = {
        "cls_step": train_step(create_model("resnet20", in_channels=1, num_classes=10, image_size=16),
                               lambda: (cls_x, cls_y), lambda z, y, _x: F.cross_entropy(z.float(), y)),
        "seg_teacher_step": train_step(create_model("unet", in_channels=1, num_classes=k, image_size=side), seg_batch,
                                       lambda z, y, _x: hard(z, y)),
        "seg_distill_step": train_step(create_model("unet_small", in_channels=1, num_classes=k, image_size=side),
                                       seg_batch, distill_loss),
    }
    out = {}
    for name, run in cases.items():
        ms_per_call(run, 3)
        out[name] = ms_per_call(run, steps)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument(CHILD, choices=["tuned", "default"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child == "tuned", args.steps)))
        return
    times: dict[str, dict[str, list[float]]] = {"tuned": {}, "default": {}}
    for _ in range(args.rounds):
        for variant in ("tuned", "default"):
            proc = subprocess.run([sys.executable, __file__, CHILD, variant, "--steps", str(args.steps)],
                                  capture_output=True, text=True, check=True)
            for case, ms in json.loads(proc.stdout.splitlines()[-1]).items():
                times[variant].setdefault(case, []).append(ms)
    med = {v: {case: statistics.median(t) for case, t in by_case.items()} for v, by_case in times.items()}
    out = {"rounds": args.rounds, "steps": args.steps,
           "ms_median": {v: {case: round(ms, 2) for case, ms in by_case.items()} for v, by_case in med.items()},
           "ratio_tuned_to_default": {case: round(med["tuned"][case] / med["default"][case], 3) for case in med["tuned"]}}
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
