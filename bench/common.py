"""Shared helpers for the benchmarks: the real CIFAR-10 JPEGs from ../shared/datasets, and the options, the
training step and the timer of the training-step benchmarks."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
CIFAR_JPEG = ROOT.parent / "shared" / "datasets" / "cifar10-jpeg-train.tar.gz"


def extract_cifar(dest: Path, per_class: int | None = None) -> Path:
    """Extract the CIFAR-10 JPEG train split (or `per_class` images of each class) to dest/train/<class>/."""
    if not CIFAR_JPEG.exists():
        raise SystemExit(f"{CIFAR_JPEG} not found: the benchmarks need the shared CIFAR-10 JPEG archive")
    taken: dict[str, int] = {}
    with tarfile.open(CIFAR_JPEG) as tar:
        for member in tar:
            parts = Path(member.name).parts
            if not member.isfile() or len(parts) < 3 or parts[-3] != "train":
                continue
            cls = parts[-2]
            if per_class is not None and taken.get(cls, 0) >= per_class:
                if len(taken) == 10 and min(taken.values()) >= per_class:
                    break
                continue
            taken[cls] = taken.get(cls, 0) + 1
            target = dest / "train" / cls / parts[-1]
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(tar.extractfile(member).read())
    return dest


def project(path: Path, params: dict, base: Path = ROOT / "params.yaml") -> Path:
    """A project folder holding `base` (the repository's params.yaml, or a preset) with `params` merged in
    (sections updated)."""
    path.mkdir(parents=True, exist_ok=True)
    merged = yaml.safe_load(base.read_text())
    for section, values in params.items():
        merged[section] = {**merged.get(section, {}), **values} if isinstance(values, dict) else values
    (path / "params.yaml").write_text(yaml.safe_dump(merged, sort_keys=False))
    return path


def stage(proj: Path, name: str, env: dict | None = None) -> dict:
    """Run `visionops <name>` in `proj`; its result (the --json output) with the wall time."""
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), **(env or {})}
    t0 = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "visionops", name, "--json"], cwd=proj, env=env,
                          stdout=subprocess.PIPE, text=True)  # its progress and errors go to our stderr
    if done.returncode:
        raise SystemExit(f"visionops {name} failed in {proj} (its error is above)")
    return {**json.loads(done.stdout), "wall_seconds": round(time.perf_counter() - t0, 1)}


def add_step_options(ap: argparse.ArgumentParser) -> None:
    """The batch, its image side and class count, and how long to time: alternating rounds of timed steps."""
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--classes", type=int, default=11)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=10)


def ms_per_call(fn, calls: int) -> float:
    """Mean wall time of `fn()` in ms over `calls` calls."""
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls * 1000


def train_step(model, batch, loss_fn):
    """A zero-argument training step of `model` as the segmentation preset trains it: channels-last, bf16
    autocast on the CPU, fused AdamW. `batch()` gives (x, y); `loss_fn(logits, y, x)` the loss."""
    import torch

    from visionops.training.device import autocast

    model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(model.parameters(), 1e-3, fused=True)

    def run():
        model.train()
        x, y = batch()
        with autocast(torch.device("cpu"), "always"):
            loss = loss_fn(model(x), y, x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return run


def test_accuracy(model_path: Path, ds: Path) -> float:
    """Accuracy of a classifier file on the test split of the dataset folder `ds`, on the CPU."""
    import torch

    from visionops.data import dataset
    from visionops.tasks.classification import classifier

    model, _ = classifier.load(model_path)
    test = dataset.load(ds).splits["test"]
    logits = classifier.predict_logits(model, test.images, torch.device("cpu"))
    return float((logits.argmax(1).numpy() == test.labels).mean())
