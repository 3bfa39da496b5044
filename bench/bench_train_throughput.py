"""Training throughput: visionops' on-device tensor pipeline vs the brief's DataLoader recipe.

Same model (lenet), same batch size, same CIFAR-10 JPEGs, same flip + rotation augmentation,
measured in one run so the ratio is robust to a noisy machine.

    python bench/bench_train_throughput.py [--images 5000] [--batch-size 128] [--epochs 2]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from common import extract_cifar

from visionops.config import AugmentConfig, DataConfig
from visionops.data import dataset
from visionops.data.download import run_download
from visionops.models import create_model
from visionops.tasks.classification import classifier
from visionops.tasks.classification.augment import BatchAugment


def baseline(root: Path, batch_size: int, epochs: int, workers: int) -> float:
    """The brief's recipe: ImageFolder + per-sample PIL flip/rotation transforms + DataLoader."""
    from torchvision import datasets, transforms

    tf = transforms.Compose(
        [transforms.RandomHorizontalFlip(), transforms.RandomRotation(10), transforms.ToTensor(),
         transforms.Normalize((0.5, 0.5, 0.5), (0.25, 0.25, 0.25))]
    )
    data = datasets.ImageFolder(root / "train", transform=tf)
    loader = torch.utils.data.DataLoader(data, batch_size=batch_size, shuffle=True, num_workers=workers, drop_last=True)
    model = create_model("lenet", in_channels=3, num_classes=10, image_size=32)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    seen, start = 0, time.perf_counter()
    for _ in range(epochs):
        for x, y in loader:
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            seen += len(y)
    return seen / (time.perf_counter() - start)


def tensor_pipeline(ds_dir: Path, batch_size: int, epochs: int) -> float:
    """visionops: uint8 tensors resident on the device, batched flip/rotation, same model and optimiser."""
    split = dataset.load(ds_dir).splits["train"]
    x = torch.from_numpy(split.images.copy()).permute(0, 3, 1, 2).contiguous()
    y = torch.from_numpy(split.labels)
    mean, std = classifier.channel_stats(split.images)
    model = classifier.Classifier(create_model("lenet", in_channels=3, num_classes=10, image_size=32), mean, std)
    aug = BatchAugment.from_config(AugmentConfig(hflip=True, rotate_degrees=10))
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    gen = torch.Generator().manual_seed(0)
    seen, start = 0, time.perf_counter()
    for _ in range(epochs):
        perm = torch.randperm(len(y), generator=gen)
        for i in range(0, len(y) - batch_size + 1, batch_size):
            idx = perm[i : i + batch_size]
            xb, yb = aug(x[idx].float().div_(255), y[idx], gen)
            loss = F.cross_entropy(model(xb), yb)
            opt.zero_grad()
            loss.backward()
            opt.step()
            seen += len(idx)
    return seen / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=5000, help="CIFAR-10 JPEGs to use (per class: images / 10)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--epochs", type=int, default=2)
    args = parser.parse_args()
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        root = extract_cifar(Path(tmp) / "jpeg", per_class=args.images // 10)
        ds_dir = Path(tmp) / "ds"
        run_download(DataConfig(source="folder", root=str(root), channels=3, val_fraction=0, test_fraction=0, holdout_fraction=0), ds_dir)
        results = {"tensor_pipeline": tensor_pipeline(ds_dir, args.batch_size, args.epochs)}
        for workers in (0, 2):
            results[f"dataloader_workers{workers}"] = baseline(root, args.batch_size, args.epochs, workers)
    best_baseline = max(v for k, v in results.items() if k.startswith("dataloader"))
    results = {k: round(v) for k, v in results.items()}
    results["speedup_vs_best_dataloader"] = round(results["tensor_pipeline"] / best_baseline, 2)
    results.update(images=args.images, batch_size=args.batch_size, epochs=args.epochs, torch_threads=torch.get_num_threads())
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
