"""DP-SGD on real CIFAR-10: test accuracy of scatternet (Tramèr & Boneh 2021) at ε = 8 and ε = 3 (δ = 1e-5).

The shared CIFAR-10 JPEGs (50,000 images) go through the pipeline's own stage functions: the `folder`
source (val 10%, test 10%, no holdout: 40,000 train images), `prepare` with no augmentation, then `train`
with `presets/dp_cifar10.yaml`'s train section (its epochs, batch size and lr can be overridden). Each ε
trains from scratch; the scattering features are computed once per run. The dataset is kept under `--work`
and reused; the models are written there too (`scatternet-eps<ε>.pt`).

    OMP_NUM_THREADS=2 python bench/bench_dp.py --threads 2 --epsilons 8,3
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import yaml
from common import CIFAR_JPEG, ROOT, extract_cifar, test_accuracy

from visionops.config import AugmentConfig, BalanceConfig, DataConfig, TrainConfig, apply_threads

PRESET = ROOT / "presets" / "dp_cifar10.yaml"


def dataset(work: Path, archive: Path) -> tuple[Path, Path]:
    """The CIFAR-10 dataset and its prepared split under `work` (made once)."""
    from visionops.data.download import run_download
    from visionops.tasks.classification.prepare import run_prepare

    ds, prepared = work / "ds", work / "prepared"
    if not (prepared / "train_indices.npy").exists():
        import common

        common.CIFAR_JPEG = archive
        root = extract_cifar(work / "jpeg")
        run_download(DataConfig(source="folder", root=str(root), channels=3, image_size=32,
                                val_fraction=0.1, test_fraction=0.1, holdout_fraction=0.0), ds)
        run_prepare(ds, BalanceConfig(), AugmentConfig(**preset()["augment"]), prepared, work / "prepare_reports")
    return ds, prepared


def preset() -> dict:
    return yaml.safe_load(PRESET.read_text())


def main() -> None:
    from visionops.tasks.classification.train import run_train

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epsilons", default="8,3")
    parser.add_argument("--delta", type=float, default=1e-5)
    parser.add_argument("--epochs", type=int, default=None, help="default: the preset's")
    parser.add_argument("--batch-size", type=int, default=None, help="default: the preset's")
    parser.add_argument("--lr", type=float, default=None, help="default: the preset's")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--work", type=Path, default=Path("/tmp/real/cifar10-dp"))
    parser.add_argument("--archive", type=Path, default=CIFAR_JPEG)
    args = parser.parse_args()
    threads = apply_threads(args.threads)
    ds, prepared = dataset(args.work, args.archive)
    base = preset()["train"]
    overrides = {k: v for k, v in {"epochs": args.epochs, "batch_size": args.batch_size, "lr": args.lr}.items() if v is not None}
    results = []
    for eps in (float(e) for e in args.epsilons.split(",")):
        privacy = {**base["privacy"], "target_epsilon": eps, "delta": args.delta}
        cfg = TrainConfig.model_validate({**base, **overrides, "privacy": privacy, "device": args.device, "threads": threads})
        out = args.work / f"scatternet-eps{eps:g}.pt"
        t0 = time.perf_counter()
        m = run_train(ds, prepared, cfg, AugmentConfig(**preset()["augment"]), out, args.work / f"reports-eps{eps:g}",
                      args.work / "checkpoint.pt")
        wall = time.perf_counter() - t0
        results.append({
            "target_epsilon": eps, "epsilon": round(m["dp_epsilon"], 3), "delta": m["dp_delta"],
            "noise_multiplier": round(m["dp_noise_multiplier"], 3), "steps": m["dp_steps"], "epochs_run": m["epochs_run"],
            "best_val_acc": round(m["best_val_acc"], 4), "test_acc": round(test_accuracy(out, ds), 4),
            "train_images": m["train_images"], "wall_seconds": round(wall, 1), "model": str(out),
        })  # fmt: skip
        print(json.dumps(results[-1]), flush=True)
    settings = {**base, **overrides}
    print(json.dumps({"threads": threads, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"), "device": args.device,
                      "cpus": os.cpu_count(), "settings": {k: settings[k] for k in ("model", "epochs", "batch_size", "lr")},
                      "results": results}, indent=2))


if __name__ == "__main__":
    main()
