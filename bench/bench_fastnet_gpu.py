"""GPU: time for the fastnet preset to reach 94% validation accuracy on CIFAR-10, then distillation.

CIFAR-10's 50,000 shared training JPEGs are split 45,000 train / 5,000 validation (stratified,
seed 0) through the `folder` source. Every run goes through `visionops.training.trainer.fit` with the
settings of presets/cifar10-fastnet.yaml (only epochs and seed change). Time to 94% is measured
the way airbench does: the whitening init, plus the training epochs up to the first one whose
validation accuracy (with the preset's test-time augmentation) reaches 94%, plus one TTA pass
over the validation set; per-epoch validation is not counted. The first run is a warm-up.

    python bench/bench_fastnet_gpu.py --data DIR --epochs 10,12 --seeds 2 --distill --out results.json

DIR holds the ImageFolder tree (DIR/<class>/*.jpg) or the shared archive's DIR/train/<class>/.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import yaml

from visionops.config import DataConfig, TrainConfig, load_params
from visionops.data.download import carve_splits
from visionops.data.sources import load_source
from visionops.evaluation.latency import measure_latency
from visionops.models import count_parameters
from visionops.tasks.classification import classifier
from visionops.tasks.classification.augment import BatchAugment
from visionops.tasks.classification.distill import DistillationLoss
from visionops.tasks.classification.losses import ClassificationLoss
from visionops.training.device import select_device, to_device
from visionops.training.trainer import evaluate_split, fit, init_from_data

PRESET = Path(__file__).resolve().parents[1] / "presets" / "cifar10-fastnet.yaml"
TARGET = 0.94


def synced(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter()


def load_data(root: Path, per_class: int | None, device: torch.device):
    if (root / "train").is_dir():
        root = root / "train"
    cfg = DataConfig(source="folder", root=str(root), channels=3, image_size=32, val_fraction=0.1, test_fraction=0.0, holdout_fraction=0.0)
    t0 = time.perf_counter()
    src = load_source(cfg)
    splits = carve_splits(src.splits, cfg)
    train, val = splits["train"], splits["val"]
    if per_class:  # a CPU smoke test on a few images
        keep = torch.cat([torch.nonzero(torch.as_tensor(train.labels) == c).flatten()[:per_class] for c in range(10)]).numpy()
        train.images, train.labels = train.images[keep], train.labels[keep]
    mean, std = classifier.channel_stats(train.images)
    print(f"data: {len(train.labels)} train / {len(val.labels)} val from {root} in {time.perf_counter() - t0:.1f}s", file=sys.stderr)
    return src.class_names, mean, std, to_device(train.images, train.labels, device), to_device(val.images, val.labels, device)


def train_run(data, cfg: TrainConfig, augment: BatchAugment, device, criterion=None, model: str | None = None) -> dict:
    """Train one model with `cfg`; return its timings, per-epoch validation accuracy and the model."""
    class_names, mean, std, train, val = data
    torch.manual_seed(cfg.seed)
    net = classifier.build(model or cfg.model, class_names, (32, 32, 3), mean, std).to(device)
    t0 = synced(device)
    init_from_data(copy.deepcopy(net), train[0], seed=cfg.seed)  # timed on a copy; fit() does it for real
    init_seconds = synced(device) - t0
    hard = ClassificationLoss(cfg.label_smoothing).to(device)
    criterion = criterion or (lambda logits, targets, _x: hard(logits, targets))
    net, state = fit(net, train, val, cfg, augment, criterion, device, desc=model or cfg.model)
    t0 = synced(device)
    final = evaluate_split(net, val[0], val[1], cfg, device)
    eval_seconds = synced(device) - t0
    elapsed, reached = init_seconds, None
    for row in state.history:
        elapsed += row["epoch_train_seconds"]
        if reached is None and row["val_acc"] >= TARGET:
            reached = {"epoch": row["epoch"], "seconds": round(elapsed + eval_seconds, 3)}
    return {
        "model": model or cfg.model,
        "epochs": cfg.epochs,
        "seed": cfg.seed,
        "val_acc": [round(r["val_acc"], 4) for r in state.history],
        "final_val_acc": round(state.history[-1]["val_acc"], 4),
        "best_val_acc": round(final["acc"], 4),
        "train_seconds": round(init_seconds + sum(r["epoch_train_seconds"] for r in state.history), 3),
        "tta_eval_seconds": round(eval_seconds, 3),
        "time_to_94": reached,
        "net": net,
    }


def summary(runs: list[dict]) -> dict:
    accs = [r["final_val_acc"] for r in runs]
    hits = [r["time_to_94"]["seconds"] for r in runs if r["time_to_94"]]
    return {
        "runs": len(runs),
        "mean_final_val_acc": round(statistics.mean(accs), 4),
        "min_final_val_acc": min(accs),
        "reached_94": f"{len(hits)}/{len(runs)}",
        "median_seconds_to_94": round(statistics.median(hits), 3) if hits else None,
        "median_train_seconds": round(statistics.median(r["train_seconds"] for r in runs), 3),
    }


def cpu_images_per_second(net: torch.nn.Module, threads: int = 2) -> float:
    torch.set_num_threads(threads)
    return measure_latency(copy.deepcopy(net).float().cpu(), (32, 32, 3), torch.device("cpu"), batch_size=64)["images_per_second"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True, help="extracted CIFAR-10 JPEG tree")
    parser.add_argument("--epochs", default="10", help="comma-separated schedule lengths to time")
    parser.add_argument("--seeds", type=int, default=2, help="runs per schedule length")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile at the first length")
    parser.add_argument("--distill", action="store_true", help="teacher -> fastnet_tiny student, with and without KD")
    parser.add_argument("--teacher-epochs", type=int, default=15)
    parser.add_argument("--student-epochs", default="20", help="comma-separated")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a train setting of the preset")
    parser.add_argument("--per-class", type=int, default=None, help="train images per class (CPU smoke test)")
    parser.add_argument("--budget", type=float, default=400.0, help="seconds after which optional parts are skipped")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = parser.parse_args()
    start = time.perf_counter()
    params = load_params(PRESET)
    overrides = {key: yaml.safe_load(value) for key, value in (item.split("=", 1) for item in args.set)}
    params = params.model_copy(update={"train": TrainConfig.model_validate({**params.train.model_dump(), **overrides})})
    device = select_device(params.train.device)
    augment = BatchAugment.from_config(params.augment, num_classes=10)
    data = load_data(args.data, args.per_class, device)
    results: dict = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "torch": torch.__version__, "train": params.train.model_dump()}

    def save() -> None:
        if args.out:
            args.out.write_text(json.dumps(results, indent=2, default=str))

    train_run(data, params.train.model_copy(update={"epochs": 1}), augment, device)  # warm-up
    lengths = [int(e) for e in args.epochs.split(",")]
    runs = []
    for epochs in lengths:
        for seed in range(args.seeds):
            run = train_run(data, params.train.model_copy(update={"epochs": epochs, "seed": seed}), augment, device)
            run.pop("net")
            runs.append(run)
            print(json.dumps(run), flush=True)
            results["time_to_94"] = {e: summary([r for r in runs if r["epochs"] == e]) for e in lengths if any(r["epochs"] == e for r in runs)}
            save()

    if args.distill and time.perf_counter() - start < args.budget:
        teacher_cfg = params.train.model_copy(update={"epochs": args.teacher_epochs})
        teacher = train_run(data, teacher_cfg, augment, device)
        teacher_net = teacher.pop("net").eval().requires_grad_(False)
        hard = ClassificationLoss(teacher_cfg.label_smoothing).to(device)
        d = params.distill
        out = {"teacher": {**teacher, "parameters": count_parameters(teacher_net)}, "students": []}
        for epochs in [int(e) for e in args.student_epochs.split(",")]:
            cfg = teacher_cfg.model_copy(update={"model": d.student, "epochs": epochs, "lr": d.lr})
            for alpha in (d.alpha, 0.0):
                kd = DistillationLoss(hard, teacher_net if alpha else None, alpha, d.temperature)
                student = train_run(data, cfg, augment, device, criterion=kd)
                net = student.pop("net")
                student.update(alpha=alpha, temperature=d.temperature, parameters=count_parameters(net))
                student["gap_to_teacher"] = round(teacher["best_val_acc"] - student["best_val_acc"], 4)
                out["students"].append(student)
                print(json.dumps(student), flush=True)
        out["parameter_ratio"] = round(out["students"][0]["parameters"] / out["teacher"]["parameters"], 4)
        teacher_ips = cpu_images_per_second(teacher_net)
        student_ips = cpu_images_per_second(net)
        out["cpu_2_threads_images_per_second"] = {"teacher": round(teacher_ips, 1), "student": round(student_ips, 1)}
        out["cpu_speedup"] = round(student_ips / teacher_ips, 2)
        results["distill"] = out
        save()

    if args.compile and device.type == "cuda" and time.perf_counter() - start < args.budget:
        cfg = params.train.model_copy(update={"epochs": lengths[0], "compile": True})
        train_run(data, cfg.model_copy(update={"epochs": 1}), augment, device)  # compile warm-up
        run = train_run(data, cfg, augment, device)
        run.pop("net")
        results["compiled"] = run
        print(json.dumps(run), flush=True)
        save()

    results["wall_seconds"] = round(time.perf_counter() - start, 1)
    save()
    print("\n== summary ==")
    print(json.dumps({k: v for k, v in results.items() if k != "train"}, indent=1, default=str))


if __name__ == "__main__":
    main()
