"""How many randomly flipped labels the `label_issues` stage ranks near the top of its report.

    .venv/bin/python bench/bench_label_issues.py                          # the embedded digits, seeds 0 1 2
    .venv/bin/python bench/bench_label_issues.py --data cifar10 --per-class 500 --seeds 0

Downloads a clean dataset (digits, or `--per-class` images of each CIFAR-10 class from the shared JPEGs,
extracted under /tmp/real), flips `--flip` of the train split's labels to another class at random, runs the
stage's function (`run_label_issues`: K-fold cross-training, cleanlab, issues.csv) with params.yaml's
label_issues section (or the overrides below), and reads its issues.csv back. Prints, per seed: recall@top-10%
(the flips among the first 10% x train-images rows of the report) and its precision, the whole report's
recall and precision, the out-of-fold accuracy and the stage's seconds. Goal (issue 28): recall@top-10% >= 0.7.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

from visionops.config import LabelIssuesConfig, load_params  # noqa: E402
from visionops.data import dataset  # noqa: E402
from visionops.data.download import run_download  # noqa: E402
from visionops.tasks.classification.label_report import run_label_issues  # noqa: E402

REAL = Path("/tmp/real")


def clean_dataset(args, out: Path) -> Path:
    """The clean source as a canonical dataset in `out`."""
    params = load_params(common.ROOT / "params.yaml")
    data = params.data
    if args.data == "cifar10":
        root = REAL / f"cifar10-{args.per_class}"
        if not root.exists():
            common.CIFAR_JPEG = args.archive
            common.extract_cifar(root, args.per_class)
        data = data.model_copy(update={"source": "folder", "root": str(root / "train"), "image_size": 32, "channels": 3})
    run_download(data, out)
    return out


def flipped_copy(clean: Path, out: Path, fraction: float, seed: int) -> np.ndarray:
    """`clean` saved to `out` with `fraction` of its train labels moved to another class; the moved rows."""
    ds = dataset.load(clean, mmap=False)
    train = ds.splits["train"]
    rng = np.random.default_rng(seed)
    flips = rng.choice(len(train), round(fraction * len(train)), replace=False)
    train.labels = train.labels.copy()
    train.labels[flips] = (train.labels[flips] + rng.integers(1, len(ds.class_names), len(flips))) % len(ds.class_names)
    dataset.save(ds, out)
    return flips


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", choices=("digits", "cifar10"), default="digits")
    ap.add_argument("--per-class", type=int, default=500, help="cifar10: images of each class taken")
    ap.add_argument("--archive", type=Path, default=common.CIFAR_JPEG, help="the CIFAR-10 JPEG archive")
    ap.add_argument("--flip", type=float, default=0.05)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--augment", choices=("params", "mirror"),
                    help="params.yaml's augment, or mirror: the fastnet preset's (mirror, 2-pixel shift); default: "
                    "mirror for cifar10, params for digits")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="label_issues overrides, e.g. epochs=30")
    args = ap.parse_args()

    params = load_params(common.ROOT / "params.yaml")
    overrides = dict(s.split("=", 1) for s in args.set)  # validated (and converted) by the schema
    cfg = LabelIssuesConfig.model_validate({**params.label_issues.model_dump(), **overrides})
    params = params.model_copy(update={"label_issues": cfg})
    if (args.augment or ("mirror" if args.data == "cifar10" else "params")) == "mirror":  # the fastnet preset's aug
        params = params.model_copy(update={"augment": params.augment.model_copy(
            update={"hflip": True, "rotate_degrees": 0.0, "crop_padding": 2})})
    print(f"label_issues: {params.label_issues.model_dump()}; augment: {params.augment.classification_policy()}")
    with tempfile.TemporaryDirectory(prefix="bench_label_issues.") as tmp:
        tmp = Path(tmp)
        clean = clean_dataset(args, tmp / "clean")
        for seed in args.seeds:
            flips = flipped_copy(clean, tmp / f"noisy{seed}", args.flip, seed)
            result = run_label_issues(params, tmp / f"noisy{seed}", tmp / f"report{seed}")
            with (tmp / f"report{seed}" / "issues.csv").open(newline="") as fh:
                listed = np.array([int(r["index"]) for r in csv.DictReader(fh)], dtype=np.int64)
            n = result["train_images"]
            top = listed[: int(np.ceil(0.1 * n))]
            print(json.dumps({
                "data": args.data, "seed": seed, "train_images": n, "flipped": len(flips), "listed": len(listed),
                "recall_top10pct": round(float(np.isin(flips, top).mean()), 4),
                "precision_top10pct": round(float(np.isin(top, flips).mean()), 4) if len(top) else None,
                "recall_listed": round(float(np.isin(flips, listed).mean()), 4),
                "precision_listed": round(float(np.isin(listed, flips).mean()), 4) if len(listed) else None,
                "out_of_fold_accuracy": round(result["out_of_fold_accuracy"], 4),
                "seconds": round(result["seconds"], 1),
            }), flush=True)


if __name__ == "__main__":
    main()
