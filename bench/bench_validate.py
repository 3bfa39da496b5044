"""Time the `validate` stage end to end on a CIFAR-10-sized dataset.

    .venv/bin/python bench/bench_validate.py                  # synthetic 50,000 + 10,000 32x32x3
    .venv/bin/python bench/bench_validate.py --dataset data/raw  # an existing canonical dataset

Prints images/s and seconds for `run_validate`, and the manifest-build seconds separately.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from visionops.config import ValidateConfig
from visionops.data.dataset import Dataset, Split, save
from visionops.tasks.classification.validate import ValidationFailed, run_validate


def synthetic(out: Path, n_train: int, n_test: int, size: int, n_classes: int = 10, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    splits = {}
    for name, n in (("train", n_train), ("test", n_test)):
        images = rng.integers(0, 256, size=(n, size, size, 3), dtype=np.uint8)
        labels = np.arange(n, dtype=np.int64) % n_classes
        splits[name] = Split(images, labels, [f"synthetic:{name}/{i}" for i in range(n)])
    save(Dataset([f"class{i}" for i in range(n_classes)], splits, "synthetic"), out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", type=Path, help="an existing canonical dataset directory")
    ap.add_argument("--train", type=int, default=50_000)
    ap.add_argument("--test", type=int, default=10_000)
    ap.add_argument("--size", type=int, default=32)
    args = ap.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench_validate.") as tmp:
        tmp = Path(tmp)
        dataset = args.dataset
        if dataset is None:
            dataset = tmp / "dataset"
            t = time.perf_counter()
            synthetic(dataset, args.train, args.test, args.size)
            print(f"built synthetic dataset ({args.train} train + {args.test} test, "
                  f"{args.size}x{args.size}x3) in {time.perf_counter() - t:.1f}s")
        t = time.perf_counter()
        try:
            summary = run_validate(dataset, ValidateConfig(), tmp / "out")
        except ValidationFailed as exc:
            summary = exc.summary
            print(exc.message)
        seconds = time.perf_counter() - t
        n = sum(summary["n_images"].values()) + summary["n_rejected"]
        print(f"validate: success={summary['success']} images={n} seconds={seconds:.2f} "
              f"images/s={n / seconds:,.0f}")
        print(f"manifest build (load + stats + hashes + leak flags): {summary['manifest_seconds']:.2f}s "
              f"({n / summary['manifest_seconds']:,.0f} images/s)")


if __name__ == "__main__":
    main()
