"""Drift detection without labels (issue 27): false alarms, power per corruption and severity, and the
label-free estimate's error, through the served model's own inference log.

    python bench/bench_drift.py model --work /tmp/drift --images 10000 --epochs 40
        Train the CIFAR-10 classifier the benchmark serves: a project on `--images` shared CIFAR-10 JPEGs (balanced,
        the first of each class by name) through the stages (`python -m visionops <stage>`) download to distill.
        The other shared JPEGs (4,000 a class at 10,000) are the pool of images it never saw.
    python bench/bench_drift.py windows --work /tmp/drift --null-windows 100 --windows 20 --out drift.json
        Register the model (stage register: its reference profile and projection), then judge windows of
        `--window-rows` pool images: unshifted (false alarms), with a class-prior shift, and with each corruption
        (corruptions.py) at each severity. Each window is encoded (PNG), answered by the registered pyfunc's
        `predict_values` (which writes the log rows, at $VISIONOPS_LOG_URI = <work>/log), read back with
        `read_log` and judged by `judge_window` against the version's reference; its true score (accuracy) is
        compared with the label-free estimate.
    python bench/bench_drift.py model --task detection --work /tmp/drift-det
    python bench/bench_drift.py windows --task detection --work /tmp/drift-det --null-windows 100 --windows 20 --severities 3
        The same on the canvases (presets/detection.yaml, presets/segmentation.yaml); the pool is canvases generated
        with another data.seed (`--pool-images` of them), which the model never saw.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import statistics
import time
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path

import common
import numpy as np
from common import ROOT, extract_cifar, project, stage
from corruptions import CORRUPTIONS, corrupt, prior_shift_window, sample_window

CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
PRESETS = {"classification": ROOT / "params.yaml", "detection": ROOT / "presets" / "detection.yaml",
           "segmentation": ROOT / "presets" / "segmentation.yaml"}
POWER_GOAL = 0.9  # a severity is detected when at least this share of its windows is flagged


def split_pool(work: Path, images: int) -> tuple[Path, Path]:
    """(the training subset's folder, the pool's folder: the JPEGs left out of it), per class, extracting once."""
    full = work / "jpeg" / "train"
    if not full.is_dir():
        extract_cifar(work / "jpeg")
    for cls in CLASSES:
        files = sorted((full / cls).glob("*.jpg"))
        for folder, part in ((work / "subset", files[:images // len(CLASSES)]), (work / "pool", files[images // len(CLASSES):])):
            (folder / cls).mkdir(parents=True, exist_ok=True)
            for f in part:
                if not (folder / cls / f.name).exists():
                    shutil.copyfile(f, folder / cls / f.name)
    return work / "subset", work / "pool"


def model_params(task: str, args) -> dict:
    """The served model's project settings (over the task's preset): tracking in <work>, the log written at
    once (the benchmark reads each window back as soon as it is answered)."""
    common_params = {
        "label_issues": {"enabled": False},
        "mlflow": {"enabled": True, "tracking_uri": f"sqlite:///{args.work / 'mlflow.db'}"},
        "monitor": {"flush_rows": args.window_rows, "flush_seconds": 0.2},
    }
    if task != "classification":
        return {**common_params, "train": {"threads": args.threads, "seed": 0},
                "distill": {"epochs": 1, "baseline": False, "quantize": False}}
    subset, _ = split_pool(args.work, args.images)
    return {
        **common_params,
        "data": {"source": "folder", "root": str(subset), "channels": 3, "image_size": 32, "val_fraction": 0.1,
                 "test_fraction": 0.1, "holdout_fraction": 0.1, "seed": 0},
        "augment": {"hflip": True, "crop_padding": 4, "rotate_degrees": 0.0},
        "train": {"model": args.model, "epochs": args.epochs, "seed": 0, "threads": args.threads},
        "distill": {"student": "resnet8", "epochs": 1, "baseline": False, "quantize": False},
    }


def train_model(args) -> dict:
    """The served model, trained through the pipeline's stages in `<work>/project`."""
    proj = project(args.work / "project", model_params(args.task, args), PRESETS[args.task])
    steps = {name: stage(proj, name) for name in ("download", "prepare", "pretrain", "train", "evaluate", "distill")}
    headline = {"classification": "accuracy", "detection": "map_50", "segmentation": "miou"}[args.task]
    return {"splits": steps["download"]["splits"], f"test_{headline}": steps["evaluate"][headline],
            "train_seconds": steps["train"].get("train_seconds"),
            "stage_seconds": {k: v["wall_seconds"] for k, v in steps.items()}}


def load_pool(args):
    """The images the model never saw, as one dataset split (images, labels, targets): the left-out CIFAR-10
    JPEGs, or canvases of another data.seed, read by the `download` stage of a project of their own."""
    from visionops.data import dataset
    from visionops.data.dataset import Split

    if args.task == "classification":
        _, pool_root = split_pool(args.work, args.images)
        params = {"data": {"source": "folder", "root": str(pool_root), "channels": 3, "image_size": 32}}
    else:
        params = {"data": {"seed": 1, "canvases": {"count": args.pool_images}}}
    proj = args.work / ("pool-project" if args.task == "classification" else f"pool-project-{args.pool_images}")
    if not (proj / "data" / "dataset" / "meta.json").exists():
        stage(project(proj, {**params, "mlflow": {"enabled": False}}, PRESETS[args.task]), "download")
    parts = [*dataset.load(proj / "data" / "dataset", mmap=False).splits.values(),
             *dataset.load(proj / "data" / "holdout", mmap=False).splits.values()]
    return Split(np.concatenate([p.images for p in parts]), np.concatenate([p.labels for p in parts]), [],
                 targets={k: np.concatenate([p.targets[k] for p in parts]) for k in parts[0].targets})


def png(image: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(buf, format="PNG")
    return buf.getvalue()


def read_window(uri: str, since: datetime, rows: int, timeout: float = 60.0):
    """The log's rows written since `since`, once all `rows` of the window are there."""
    from visionops.monitoring.inference_log import read_log

    deadline = time.monotonic() + timeout
    while True:
        frame = read_log(uri, since=since)
        if len(frame) >= rows or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    if len(frame) != rows:
        raise SystemExit(f"the inference log at {uri} holds {len(frame)} rows of a window of {rows} after {timeout} s")
    return frame


class Judge:
    """The registered model served with the log on, its reference, and what judging a window measures."""

    def __init__(self, args):
        import mlflow

        from visionops.config import load_params
        from visionops.monitoring.reference import load_reference
        from visionops.monitoring.served_log import LOG_URI_ENV

        proj = project(args.work / "project", model_params(args.task, args), PRESETS[args.task])  # monitor settings
        params = load_params(proj / "params.yaml")
        registered = stage(proj, "register")["registered"][0]  # its promotion's predictions log where params say
        uri = f"models:/{registered['name']}/{registered['version']}"
        self.log_uri = str(args.work / "log")
        shutil.rmtree(self.log_uri, ignore_errors=True)
        os.environ[LOG_URI_ENV] = self.log_uri
        os.environ["MLFLOW_TRACKING_URI"] = params.mlflow.tracking_uri
        self.served = mlflow.pyfunc.load_model(uri).unwrap_python_model()
        self.reference = load_reference(uri)
        self.task, self.settings, self.model_uri = args.task, params.monitor, uri
        self.seconds = Counter()

    def __call__(self, pool, idx: np.ndarray, images: np.ndarray) -> dict:
        from visionops.data.dataset import Split
        from visionops.monitoring.drift import judge_window
        from visionops.monitoring.reference import scores

        t0 = time.perf_counter()
        values = [png(img) for img in images]
        since = datetime.now(timezone.utc)
        t1 = time.perf_counter()
        out = self.served.predict_values(values)
        t2 = time.perf_counter()
        rows = read_window(self.log_uri, since, len(values))
        t3 = time.perf_counter()
        verdict = judge_window(self.reference, rows, task=self.task, class_names=self.served.class_names,
                               settings=self.settings)
        t4 = time.perf_counter()
        truth = Split(images, pool.labels[idx], [], targets={k: v[idx] for k, v in pool.targets.items()})
        true = float(np.mean(scores(self.task, self.served, out, truth)))
        self.seconds.update(encode=t1 - t0, predict=t2 - t1, read_log=t3 - t2, judge=t4 - t3,
                            score=time.perf_counter() - t4)
        return {"drifted": verdict.drifted, "flagged_by": sorted(k for k, t in verdict.tests.items() if t["drifted"]),
                "estimate": verdict.estimate["estimate"], "true": true}


def cell(windows: list[dict]) -> dict:
    """A shift's summary over its windows: share flagged, by test, estimate against the true score."""
    errors = [w["estimate"] - w["true"] for w in windows]
    summary = {"windows": len(windows), "flagged": sum(w["drifted"] for w in windows) / len(windows),
               "flagged_by": {k: n / len(windows) for k, n in sorted(Counter(t for w in windows for t in w["flagged_by"]).items())},
               "true_mean": statistics.mean(w["true"] for w in windows),
               "estimate_mean": statistics.mean(w["estimate"] for w in windows),
               "mean_error": statistics.mean(errors), "mean_abs_error": statistics.mean(map(abs, errors)),
               "max_abs_error": max(map(abs, errors))}
    return json.loads(json.dumps(summary), parse_float=lambda v: round(float(v), 4))


def measure(args) -> dict:
    """Every window of every shift (seeded per shift and window), and each corruption's smallest detected severity."""
    t0 = time.perf_counter()
    pool = load_pool(args)
    judge = Judge(args)
    setup_seconds = time.perf_counter() - t0
    labels = pool.labels
    shifts = [("none", 0, args.null_windows), ("prior", 0, args.prior_windows if args.task == "classification" else 0)]
    shifts += [(c, s, args.windows) for c in CORRUPTIONS for s in args.severities]
    cells: dict[str, dict] = {}
    for k, (shift, severity, count) in enumerate(shifts):
        windows = []
        for w in range(count):
            rng = np.random.default_rng([args.seed, k, w])
            idx = np.sort((prior_shift_window if shift == "prior" else sample_window)(labels, args.window_rows, rng))
            images = pool.images[idx]
            if shift in CORRUPTIONS:
                images = corrupt(images, shift, severity, seed=int(rng.integers(2**31)))
            windows.append(judge(pool, idx, images))
        if count:
            name = f"{shift}-{severity}" if severity else shift
            cells[name] = cell(windows)
            print(f"{name}: {json.dumps(cells[name])}", flush=True)
    smallest = {c: next((s for s in args.severities if cells[f"{c}-{s}"]["flagged"] >= POWER_GOAL), None)
                for c in CORRUPTIONS}
    return {"model_uri": judge.model_uri, "reference_rows": len(judge.reference), "pool_images": len(labels),
            "alpha": judge.settings.alpha, "cells": cells, "smallest_detected_severity": smallest,
            "setup_seconds": round(setup_seconds, 1), "window_seconds": {k: round(v, 1) for k, v in judge.seconds.items()},
            "log_stats": judge.served.served_log.stats if judge.served.served_log else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["model", "windows"])
    parser.add_argument("--work", type=Path, required=True, help="the benchmark's folder (kept: windows reuses the model)")
    parser.add_argument("--task", choices=sorted(PRESETS), default="classification")
    parser.add_argument("--images", type=int, default=10000, help="classification: CIFAR-10 images the model trains on")
    parser.add_argument("--model", default="resnet8", help="classification: train.model")
    parser.add_argument("--epochs", type=int, default=40, help="classification: train.epochs")
    parser.add_argument("--threads", type=int, default=1, help="train.threads")
    parser.add_argument("--pool-images", type=int, default=3000, help="detection, segmentation: pool canvases")
    parser.add_argument("--window-rows", type=int, default=500)
    parser.add_argument("--null-windows", type=int, default=100, help="unshifted windows")
    parser.add_argument("--prior-windows", type=int, default=20, help="classification: class-prior shifted windows")
    parser.add_argument("--windows", type=int, default=20, help="windows per corruption and severity")
    parser.add_argument("--severities", type=lambda s: [int(x) for x in s.split(",")], default=[1, 2, 3, 4, 5])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, help="also write the result JSON here")
    parser.add_argument("--shared", type=Path, default=common.CIFAR_JPEG.parent,
                        help="the shared datasets folder (default: %(default)s)")
    args = parser.parse_args()
    common.CIFAR_JPEG = args.shared / common.CIFAR_JPEG.name
    args.work = args.work.resolve()
    t0 = time.perf_counter()
    result = {"model": train_model, "windows": measure}[args.what](args)
    text = json.dumps({**vars(args), **result, "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                       "bench_seconds": round(time.perf_counter() - t0, 1)}, indent=2, default=str)
    if args.out:
        args.out.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
