"""LeNet training throughput (images/s) on the CPU at each torch thread count, alternating, in one process.

What `train.threads` is for: on a machine whose cores are busy with other work, more intra-op threads
can be much slower than one. Rounds alternate between the thread counts so both see the same load.

    python bench/bench_threads.py [--threads 1 2] [--rounds 5] [--steps 20] [--batch-size 128]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch
import torch.nn.functional as F

from visionops.models import create_model


def steps_per_second(model, opt, x, y, steps: int) -> float:
    start = time.perf_counter()
    for _ in range(steps):
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return steps / (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch-size", type=int, default=128)
    args = ap.parse_args()
    torch.manual_seed(0)
    model = create_model("lenet", in_channels=3, num_classes=10, image_size=32)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x, y = torch.randn(args.batch_size, 3, 32, 32), torch.randint(0, 10, (args.batch_size,))
    steps_per_second(model, opt, x, y, 3)  # warm-up
    rates: dict[int, list[float]] = {t: [] for t in args.threads}
    for _ in range(args.rounds):
        for t in args.threads:
            torch.set_num_threads(t)
            rates[t].append(steps_per_second(model, opt, x, y, args.steps) * args.batch_size)
    print(json.dumps({
        "cpus": os.cpu_count(), "load_average_1m": round(os.getloadavg()[0], 2), "batch_size": args.batch_size,
        "images_per_second": {t: {"median": round(statistics.median(r)), "min": round(min(r)), "max": round(max(r))}
                              for t, r in rates.items()},
    }, indent=2))


if __name__ == "__main__":
    main()
