"""Self-supervised pretraining (stage pretrain, SimSiam) and label efficiency, on real data.

    python bench/bench_pretrain.py probe --images 5000 --epochs 20
        CIFAR-10 JPEGs (shared), data.label_fraction 0.1: the pretrain stage on every train image, its time, and
        the kNN probe on val (10% of the train labels as memory) of the pretrained encoder vs the random one.
    python bench/bench_pretrain.py cifar --images 5000 --epochs 20 --train-epochs 15 --seeds 0,1,2
        The same, then train on the 10% labels from the backbone (`train.init: pretrain`) and from scratch with
        the same budget, per seed: test accuracy of each (the issue's goal: +5 points).
    python bench/bench_pretrain.py dense --task detection --epochs 10 --train-steps 240 --train-batch-size 16
        raccoon (mAP@.5) or, with --task segmentation, membrane (mIoU): scratch vs pretrain on its own images vs a
        transfer from a CIFAR-10 classifier registered in a (temporary) MLflow registry (`train.init: models:/...`),
        per seed (train.seed and pretrain.seed; one classifier for all): the headline score and each starting
        point's pipeline time (download to evaluate), then each one's mean, spread and mean pipeline time.

All three drive the pipeline's own stages (`python -m visionops <stage>`) in a temporary project, so they run the
stages as `dvc repro` does.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tarfile
import tempfile
import time
from pathlib import Path

import common
from common import extract_cifar, project, stage

DENSE = {  # task -> (archive, data section, headline metric, encoder-sharing models: task's, CIFAR classifier's)
    "detection": ("raccoon-voc.tar.gz", {"source": "voc", "root": "raccoon-voc", "image_size": 128, "channels": 3},
                  "map_50", ("centernet", "centernet_backbone")),
    "segmentation": ("membrane-masks.tar.gz", {"source": "masks", "root": "membrane-masks", "image_size": 128,
                                               "channels": 1}, "miou", ("unet", "unet_backbone")),
}


def cifar_params(root: Path, args, seed: int) -> dict:
    return {
        "data": {"source": "folder", "root": str(root), "channels": 3, "image_size": 32, "label_fraction": 0.1,
                 "holdout_fraction": 0.0, "seed": 0},
        "label_issues": {"enabled": False},
        "augment": {"hflip": True, "crop_padding": 4, "rotate_degrees": 0.0},
        "pretrain": {"enabled": True, "epochs": args.epochs, "batch_size": 256, "seed": seed},
        "train": {"model": args.model, "epochs": args.train_epochs, "seed": seed, "threads": "auto"},
        "mlflow": {"enabled": False},
    }


def probe(tmp: Path, args) -> dict:
    """The pretrain stage on CIFAR-10 at data.label_fraction 0.1: time, loss, collapse indicator, kNN probes."""
    root = extract_cifar(tmp / "jpeg", per_class=args.images // 10)
    proj = project(tmp / "probe", cifar_params(root / "train", args, 0))
    download = stage(proj, "download")
    prepare = stage(proj, "prepare")
    result = stage(proj, "pretrain")
    keys = ("epochs_run", "final_loss", "final_output_std", "knn_acc", "knn_acc_random_init",
            "knn_memory_images", "train_seconds", "train_images_per_second", "wall_seconds")
    return {"splits": download["splits"], "pretrain_images": result["images"], "labelled_images": prepare["labelled_images"],
            "unlabelled_images": prepare["unlabelled_images"], **{k: result.get(k) for k in keys}}


def cifar(tmp: Path, args) -> dict:
    """Per seed: pretrain, then train on the 10% labels from the backbone and from scratch; test accuracy."""
    root = extract_cifar(tmp / "jpeg", per_class=args.images // 10)
    out: dict = {"runs": []}
    for seed in args.seeds:
        row = {"seed": seed}
        for init in ("pretrain", "scratch"):
            params = cifar_params(root / "train", args, seed)
            params["pretrain"]["enabled"] = init == "pretrain"
            params["train"]["init"] = init
            proj = project(tmp / f"cifar-{seed}-{init}", params)
            for name in ("download", "prepare"):
                stage(proj, name)
            pre = stage(proj, "pretrain")
            train = stage(proj, "train")
            evaluate = stage(proj, "evaluate")
            row[init] = {"test_acc": evaluate["accuracy"], "train_seconds": train.get("train_seconds"),
                         **({"pretrain_seconds": pre["train_seconds"], "knn_acc": pre["knn_acc"],
                             "knn_acc_random_init": pre["knn_acc_random_init"]} if init == "pretrain" else {})}
        row["gain"] = row["pretrain"]["test_acc"] - row["scratch"]["test_acc"]
        out["runs"].append(row)
    gains = [r["gain"] for r in out["runs"]]
    out["mean_gain"] = statistics.mean(gains)
    out["gain_std"] = statistics.stdev(gains) if len(gains) > 1 else None
    return out


def dense(tmp: Path, args) -> dict:
    """Scratch vs pretrain on the task's own images vs a registered CIFAR-10 classifier's encoder."""
    archive, data, headline, (model, classifier) = DENSE[args.task]
    shared = common.CIFAR_JPEG.parent
    if not (shared / archive).exists():
        raise SystemExit(f"{shared / archive} not found: the dense benchmark needs the shared archive")
    with tarfile.open(shared / archive) as tar:
        tar.extractall(tmp / "data", filter="data")
    env = {"MLFLOW_TRACKING_URI": f"sqlite:///{tmp / 'mlflow.db'}"}
    t0 = time.perf_counter()
    source = register_cifar_classifier(tmp, args, classifier, env)
    classifier_seconds = round(time.perf_counter() - t0, 1)
    base = {
        "task": args.task, "data": {**data, "root": str(tmp / "data" / data["root"])},
        "label_issues": {"enabled": False},
        "augment": {"hflip": True, "rotate_degrees": 0.0, "crop_padding": 0, "scale_jitter": 0.2, "translate": 0.1},
        "train": {"model": model, "epochs": args.train_epochs, "optimizer": "adamw", "lr": 0.002, "seed": 0},
        "distill": {"student": f"{model}_tiny" if model == "centernet" else "unet_small"},
        "pretrain": {"enabled": False, "epochs": args.epochs, "batch_size": 32},
        "mlflow": {"enabled": False},
    }
    base["train"].update({k: v for k, v in (("steps", args.train_steps), ("batch_size", args.train_batch_size)) if v})
    out: dict = {"task": args.task, "transfer_from": source, "classifier_seconds": classifier_seconds, "runs": []}
    starts = (("scratch", "scratch"), ("pretrain_own_images", "pretrain"), ("cifar_classifier", source))
    for seed in args.seeds:
        row: dict = {"seed": seed}
        for name, init in starts:
            params = json.loads(json.dumps(base))
            params["train"].update(init=init, seed=seed)
            params["pretrain"].update(enabled=init == "pretrain", seed=seed)
            proj = project(tmp / f"{name}-{seed}", params)
            steps = {step: stage(proj, step, env) for step in ("download", "prepare", "pretrain", "train", "evaluate")}
            row[name] = {headline: steps["evaluate"][headline], "train_seconds": steps["train"].get("train_seconds"),
                         "pipeline_seconds": round(sum(s["wall_seconds"] for s in steps.values()), 1),
                         **({"pretrain_seconds": steps["pretrain"].get("train_seconds")} if init == "pretrain" else {})}
        out["runs"].append(row)
    for name, _ in starts:
        scores = [r[name][headline] for r in out["runs"]]
        out[name] = {f"mean_{headline}": statistics.mean(scores), "std": statistics.stdev(scores) if len(scores) > 1 else None,
                     "min": min(scores), "max": max(scores),
                     "mean_pipeline_seconds": statistics.mean(r[name]["pipeline_seconds"] for r in out["runs"])}
    return out


def register_cifar_classifier(tmp: Path, args, model: str, env: dict) -> str:
    """Train `model` (a classifier sharing the dense model's encoder) on the CIFAR-10 subset and register it in
    the temporary store; its models:/ URI."""
    root = extract_cifar(tmp / "jpeg", per_class=args.images // 10)
    params = cifar_params(root / "train", args, 0)
    params["data"].update(label_fraction=1.0, channels=DENSE[args.task][1]["channels"])
    params["pretrain"]["enabled"] = False
    params["train"].update(model=model, epochs=args.classifier_epochs)
    proj = project(tmp / f"cifar-{model}", params)
    for name in ("download", "prepare", "train"):
        stage(proj, name)
    os.environ.update(env)
    import mlflow

    from visionops.tasks import get_task

    name = f"bench-cifar-{model}"
    with mlflow.start_run():
        version = get_task("classification").log_model(proj / "models" / "teacher.pt", name, {}, None)
    return f"models:/{name}/{version.version}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["probe", "cifar", "dense"])
    parser.add_argument("--images", type=int, default=5000, help="CIFAR-10 images taken, balanced")
    parser.add_argument("--epochs", type=int, default=20, help="pretrain epochs")
    parser.add_argument("--train-epochs", type=int, default=15)
    parser.add_argument("--train-steps", type=int, default=None, help="dense: train.steps (None: --train-epochs)")
    parser.add_argument("--train-batch-size", type=int, default=None, help="dense: train.batch_size (None: params.yaml's)")
    parser.add_argument("--classifier-epochs", type=int, default=10, help="dense: the CIFAR-10 classifier's epochs")
    parser.add_argument("--model", default="resnet20", help="cifar, probe: train.model")
    parser.add_argument("--seeds", type=lambda s: [int(x) for x in s.split(",")], default=[0, 1, 2])
    parser.add_argument("--task", choices=sorted(DENSE), default="detection")
    parser.add_argument("--shared", type=Path, default=common.CIFAR_JPEG.parent,
                        help="the shared datasets folder (default: %(default)s)")
    args = parser.parse_args()
    common.CIFAR_JPEG = args.shared / common.CIFAR_JPEG.name
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        result = {"probe": probe, "cifar": cifar, "dense": dense}[args.what](Path(tmp), args)
    print(json.dumps({**vars(args), **result, "bench_seconds": round(time.perf_counter() - t0, 1)}, indent=2, default=str))


if __name__ == "__main__":
    main()
