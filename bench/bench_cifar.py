"""Real CIFAR-10 figures on the CPU: model comparison and teacher → student distillation.

Uses a class-balanced subset of the shared CIFAR-10 JPEGs through the `folder` source, then the
pipeline's own stage functions (download → prepare → train → distill).

    python bench/bench_cifar.py compare --images 10000 --epochs 4            # lenet vs resnet20
    python bench/bench_cifar.py distill --images 10000 --teacher fastnet --student slim_resnet
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from common import extract_cifar, test_accuracy

from visionops.config import (
    AugmentConfig,
    BalanceConfig,
    DataConfig,
    DistillConfig,
    TrainConfig,
)
from visionops.tasks.classification.distill import run_distill
from visionops.tasks.classification.prepare import run_prepare
from visionops.tasks.classification.train import run_train

AUGMENT = AugmentConfig(hflip=True, crop_padding=4)


def prepare(tmp: Path, images: int) -> tuple[Path, Path]:
    root = extract_cifar(tmp / "jpeg", per_class=images // 10)
    ds, prepared = tmp / "ds", tmp / "prepared"
    from visionops.data.download import run_download

    run_download(DataConfig(source="folder", root=str(root), channels=3, image_size=32, val_fraction=0.1, test_fraction=0.1, holdout_fraction=0.0), ds)
    run_prepare(ds, BalanceConfig(), AUGMENT, prepared, tmp / "prepare_reports")
    return ds, prepared


def train(tmp: Path, ds: Path, prepared: Path, model: str, epochs: int, **kw) -> tuple[dict, Path]:
    cfg = TrainConfig(model=model, epochs=epochs, batch_size=128, lr=kw.pop("lr", 0.05), **kw)
    out = tmp / f"{model}.pt"
    t0 = time.perf_counter()
    metrics = run_train(ds, prepared, cfg, AUGMENT, out, tmp / f"{model}_reports", tmp / f"{model}.ckpt")
    metrics["wall_seconds"] = time.perf_counter() - t0
    return metrics, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["compare", "distill"])
    parser.add_argument("--images", type=int, default=10000)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--models", default="lenet,resnet20", help="compare: models to train")
    parser.add_argument("--teacher", default="fastnet")
    parser.add_argument("--student", default="slim_resnet")
    parser.add_argument("--student-epochs", type=int, default=None)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        ds, prepared = prepare(tmp, args.images)
        if args.what == "compare":
            results = {}
            for model in args.models.split(","):
                metrics, path = train(tmp, ds, prepared, model, args.epochs)
                results[model] = {
                    "test_acc": round(test_accuracy(path, ds), 4),
                    "best_val_acc": round(metrics["best_val_acc"], 4),
                    "parameters": metrics["parameters"],
                    "train_seconds": round(metrics["wall_seconds"], 1),
                }
        else:
            _, teacher = train(tmp, ds, prepared, args.teacher, args.epochs)
            cfg = DistillConfig(student=args.student, epochs=args.student_epochs or args.epochs, baseline=True, quantize=False)
            train_cfg = TrainConfig(model=args.teacher, epochs=args.epochs, batch_size=128)
            results = run_distill(ds, prepared, teacher, cfg, train_cfg, AUGMENT, tmp / "student.pt", tmp / "distill", tmp / "ck")
    print(json.dumps({"images": args.images, "epochs": args.epochs, **results}, indent=2, default=str))


if __name__ == "__main__":
    main()
