"""CPU training step of a model with `train.amp` / `train.channels_last` off vs `always`, alternating, in one process.

What the segmentation preset's `always` buys: oneDNN's bf16 autocast and NHWC convolutions on the CPU. Each
round times both settings back to back (the visionops autocast and memory-format helpers, the segmenter's
own loss for segmentation models, cross-entropy otherwise), so both see the same machine load.

    python bench/bench_cpu_speed_switches.py [--model unet] [--batch-size 16] [--rounds 5] [--steps 10]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F
from common import add_step_options

from visionops.model_names import MODEL_TASKS
from visionops.models import create_model
from visionops.training.device import autocast, memory_format

CPU = torch.device("cpu")


def ms_per_image(mode: str, model, opt, loss_fn, x, y, steps: int) -> float:
    model = model.to(memory_format=memory_format(CPU, mode))
    x = x.contiguous(memory_format=memory_format(CPU, mode))
    start = time.perf_counter()
    for _ in range(steps):
        with autocast(CPU, mode):
            loss = loss_fn(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return (time.perf_counter() - start) / (steps * len(x)) * 1000


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="unet")
    add_step_options(ap)
    args = ap.parse_args()
    torch.manual_seed(0)
    model = create_model(args.model, in_channels=1, num_classes=args.classes, image_size=args.image_size)
    opt = torch.optim.AdamW(model.parameters(), 1e-3)
    x = torch.rand(args.batch_size, 1, args.image_size, args.image_size)
    if MODEL_TASKS[args.model] == "segmentation":
        from visionops.tasks.segmentation.losses import PixelLoss

        loss_fn = PixelLoss([0.1] + [1.0] * (args.classes - 1))
        y = torch.randint(0, args.classes, (args.batch_size, args.image_size, args.image_size), dtype=torch.uint8)
    else:
        loss_fn = lambda logits, labels: F.cross_entropy(logits.float(), labels)  # noqa: E731
        y = torch.randint(0, args.classes, (args.batch_size,))
    times = {"off": [], "always": []}
    for mode in times:  # warm-up
        ms_per_image(mode, model, opt, loss_fn, x, y, 3)
    for _ in range(args.rounds):
        for mode in times:
            times[mode].append(ms_per_image(mode, model, opt, loss_fn, x, y, args.steps))
    med = {mode: statistics.median(t) for mode, t in times.items()}
    print(json.dumps({"model": args.model, "batch_size": args.batch_size, "threads": torch.get_num_threads(),
                      "ms_per_image_median": {k: round(v, 3) for k, v in med.items()},
                      "speedup": round(med["off"] / med["always"], 2)}, indent=2))


if __name__ == "__main__":
    main()
