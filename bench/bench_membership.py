"""Membership-inference audit of real classifiers: the loss-threshold and calibrated attacks' AUC and TPR
at 1% FPR (`visionops.evaluation.membership`), train members against the frozen holdout.

    python bench/bench_membership.py default                      # params.yaml: the embedded digits pipeline
    python bench/bench_membership.py overfit --images 1000 --epochs 60   # few CIFAR-10 JPEGs, many epochs
    python bench/bench_membership.py overfit --jpeg /tmp/real/train       # the JPEGs already extracted
    python bench/bench_membership.py model --model models/teacher.pt --dataset data/dataset --holdout data/holdout

`model` audits any classifier file (a DP-SGD teacher, say) on the dataset it was trained on.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

from common import ROOT, extract_cifar

from visionops.config import AugmentConfig, BalanceConfig, DataConfig, TrainConfig, load_params
from visionops.data.download import run_download
from visionops.tasks.classification.prepare import run_prepare
from visionops.tasks.classification.train import run_train


def audit(model_path: Path, dataset_dir: Path, holdout_dir: Path | None) -> dict:
    """Both attacks on the model's train split against the holdout (None: the dataset's test split, for a
    model that never saw it, such as bench_dp.py's), and its test accuracy."""
    import torch

    from visionops.data import dataset
    from visionops.evaluation import membership
    from visionops.tasks.classification import classifier
    from visionops.tasks.classification import membership as signals

    cpu = torch.device("cpu")
    model, info = classifier.load(model_path, cpu)
    ds = dataset.load(dataset_dir)
    holdout = (ds.splits["test"] if holdout_dir is None
               else membership.load_nonmembers(holdout_dir, ds.class_names, ds.image_shape))
    result, _ = membership.audit_splits(signals.signals(model, cpu, 512), ds.splits["train"], holdout)
    test = ds.splits["test"]
    acc = float((classifier.predict_logits(model, test.images, cpu).argmax(1).numpy() == test.labels).mean())
    return {"model": info["arch"], "train_images": len(ds.splits["train"]), "test_acc": round(acc, 4),
            **{k: round(v, 4) if isinstance(v, float) else v for k, v in result.items()}}


def take(jpeg: Path, dest: Path, per_class: int) -> Path:
    """The first `per_class` JPEGs of each class folder of `jpeg`, copied to dest/train/<class>/."""
    for cls in sorted(d for d in jpeg.iterdir() if d.is_dir()):
        (dest / "train" / cls.name).mkdir(parents=True)
        for f in sorted(cls.glob("*.jpg"))[:per_class]:
            shutil.copy(f, dest / "train" / cls.name / f.name)
    return dest


def pipeline(tmp: Path, data: DataConfig, balance: BalanceConfig, augment: AugmentConfig, train: TrainConfig) -> dict:
    """download → prepare → train with the stage functions, then the audit."""
    ds, holdout, prepared = tmp / "dataset", tmp / "holdout", tmp / "prepared"
    run_download(data, ds, holdout)
    run_prepare(ds, balance, augment, prepared, tmp / "prepare_reports")
    t0 = time.perf_counter()
    run_train(ds, prepared, train, augment, tmp / "model.pt", tmp / "train_reports", tmp / "train.ckpt")
    return {"train_seconds": round(time.perf_counter() - t0, 1), "epochs": train.epochs,
            **audit(tmp / "model.pt", ds, holdout)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["default", "overfit", "model"])
    parser.add_argument("--images", type=int, default=1000, help="overfit: CIFAR-10 JPEGs taken (class-balanced)")
    parser.add_argument("--epochs", type=int, default=60, help="overfit: training epochs")
    parser.add_argument("--arch", default="resnet20", help="overfit: the network")
    parser.add_argument("--jpeg", type=Path, help="overfit: extracted CIFAR-10 JPEGs, <class>/*.jpg (default: the archive)")
    parser.add_argument("--model", type=Path, help="model: a classifier file")
    parser.add_argument("--dataset", type=Path, default=Path("data/dataset"), help="model: the data it was trained on")
    parser.add_argument("--holdout", type=Path, default=Path("data/holdout"), help="model: the frozen holdout; 'test': the dataset's test split (never trained on)")
    args = parser.parse_args()
    if args.what == "model":
        print(json.dumps(audit(args.model, args.dataset, None if str(args.holdout) == "test" else args.holdout), indent=2))
        return
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if args.what == "default":  # the committed params.yaml: digits, resnet20, 10 epochs, light augmentation
            p = load_params(ROOT / "params.yaml")
            result = pipeline(tmp, p.data, p.balance, p.augment, p.train)
        else:  # no augmentation, so the network sees each image unchanged, epoch after epoch
            per_class = args.images // 10
            root = take(args.jpeg, tmp / "jpeg", per_class) if args.jpeg else extract_cifar(tmp / "jpeg", per_class=per_class)
            data = DataConfig(source="folder", root=str(root), channels=3, image_size=32, val_fraction=0.1,
                              test_fraction=0.1, holdout_fraction=0.2)
            augment = AugmentConfig(rotate_degrees=0.0, crop_padding=0)
            train = TrainConfig(model=args.arch, epochs=args.epochs, early_stopping_patience=0)
            result = pipeline(tmp, data, BalanceConfig(), augment, train)
    print(json.dumps({"what": args.what, **result}, indent=2))


if __name__ == "__main__":
    main()
