"""Scoring a segmentation test split: torchmetrics (import + its three metrics) vs visionops' one confusion matrix.

Each way runs in a fresh Python process (torch already imported, as in every stage that scores masks),
alternating, on the same seeded masks the size of the segmentation preset's test split; it checks the
two agree and prints the median seconds of each.

    python bench/bench_segmentation_metrics.py [--images 1200] [--size 64] [--classes 11] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys

SETUP = """
import time, torch
g = torch.Generator().manual_seed(0)
truth = torch.randint(0, {k}, ({n}, {s}, {s}), generator=g, dtype=torch.uint8)
pred = torch.where(torch.rand({n}, {s}, {s}, generator=g) < 0.9, truth, torch.randint(0, {k}, ({n}, {s}, {s}), generator=g).to(torch.uint8))
names = [str(i) for i in range({k})]
t0 = time.perf_counter()
"""
TORCHMETRICS = """
from torchmetrics.classification import MulticlassAccuracy, MulticlassF1Score, MulticlassJaccardIndex
p, t = pred.long(), truth.long()
iou = MulticlassJaccardIndex({k}, average="none", ignore_index=255)(p, t)
MulticlassF1Score({k}, average="none", ignore_index=255, multidim_average="global")(p, t)
MulticlassAccuracy({k}, average="micro", ignore_index=255)(p, t)
miou = float(iou.mean())
"""
VISIONOPS = """
from visionops.tasks.segmentation.metrics import image_miou, segmentation_metrics
miou = segmentation_metrics(pred, truth, names)["miou"]
image_miou(pred, truth, {k})
"""
REPORT = "\nprint(time.perf_counter() - t0, miou)\n"


def run(body: str, **fmt) -> tuple[float, float]:
    out = subprocess.run([sys.executable, "-c", (SETUP + body + REPORT).format(**fmt)], check=True,
                         capture_output=True, text=True).stdout.split()
    return float(out[0]), float(out[1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=1200)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--classes", type=int, default=11)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    fmt = {"n": args.images, "s": args.size, "k": args.classes}
    times: dict[str, list[float]] = {"torchmetrics": [], "visionops": []}
    for _ in range(args.rounds):
        (t_tm, miou_tm), (t_vo, miou_vo) = run(TORCHMETRICS, **fmt), run(VISIONOPS, **fmt)
        assert abs(miou_tm - miou_vo) < 1e-6, (miou_tm, miou_vo)
        times["torchmetrics"].append(t_tm)
        times["visionops"].append(t_vo)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(json.dumps({**fmt, "seconds_median": {k: round(v, 3) for k, v in med.items()},
                      "ratio": round(med["torchmetrics"] / med["visionops"], 1)}, indent=2))


if __name__ == "__main__":
    main()
