"""Served latency with the inference log on vs off: the registered pyfunc's `predict` on CIFAR-10 JPEGs.

One registered classifier (params.yaml's `train.model` at 32 x 32, seeded and untrained: latency does not
depend on the weights) with its reference profile, in an MLflow SQLite store in a temporary folder, loaded
once through `mlflow.pyfunc.load_model` with the log on (a local folder). Rounds alternate between the log
off (the served model's log detached) and on, in one process, so both see the same load; each round times
`--calls` predicts of a batch of base64 JPEGs as `mlflow models serve` receives them. The goal is on/off at
most 1.05 (issue 27). Also reported: the time `LogWriter.write` itself takes on the request path.

    python bench/bench_inference_log.py [--batches 64 1] [--rounds 10] [--calls 20] [--arch resnet20]
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import extract_cifar  # noqa: E402


def register(tmp: Path, arch: str, per_class: int) -> tuple[str, list[str]]:
    """A registered classifier with its profile (val split of CIFAR-10 JPEGs); (model URI, base64 JPEGs)."""
    import mlflow
    import torch
    from PIL import Image

    from visionops.config import MonitorConfig
    from visionops.data import dataset
    from visionops.monitoring import reference
    from visionops.tasks import get_task
    from visionops.tasks.classification import classifier

    files = sorted(extract_cifar(tmp / "cifar", per_class=per_class).glob("train/*/*.jpg"))
    classes = sorted({f.parent.name for f in files})
    images = np.stack([np.asarray(Image.open(f).convert("RGB")) for f in files])
    labels = np.array([classes.index(f.parent.name) for f in files])
    split = dataset.Split(images, labels, [str(f) for f in files])
    dataset.save(dataset.Dataset(classes, {"train": split, "val": split, "test": split}, "cifar10"), tmp / "ds")
    torch.manual_seed(0)
    mean, std = classifier.channel_stats(images)
    classifier.save(tmp / "model.pt", classifier.build(arch, classes, (32, 32, 3), mean, std).eval(), arch, classes, (32, 32, 3))
    mlflow.set_tracking_uri(f"sqlite:///{tmp / 'mlflow.db'}")
    mlflow.set_experiment("bench")
    settings = MonitorConfig(log_uri=str(tmp / "log")).model_dump()
    with mlflow.start_run():
        profile = reference.build("classification", tmp / "model.pt", tmp / "ds", settings, tmp / "profile", "bench")
        version = get_task("classification").log_model(tmp / "model.pt", "bench", {}, None, profile)
    return f"models:/bench/{version.version}", [base64.b64encode(f.read_bytes()).decode() for f in files]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batches", type=int, nargs="+", default=[64, 1])
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--calls", type=int, default=20)
    ap.add_argument("--arch", default="resnet20")
    ap.add_argument("--per-class", type=int, default=10, help="CIFAR-10 JPEGs per class (the requests and the reference)")
    args = ap.parse_args()
    import mlflow
    import pandas as pd
    import torch

    from visionops.monitoring.inference_log import LogWriter, read_log

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    with tempfile.TemporaryDirectory(prefix="bench-inference-log-") as tmp:
        tmp = Path(tmp)
        uri, jpegs = register(tmp, args.arch, args.per_class)
        os.environ["VISIONOPS_LOG_URI"] = str(tmp / "log")
        served = mlflow.pyfunc.load_model(uri)
        python_model = served.unwrap_python_model()
        log = python_model.served_log
        assert log is not None, "the inference log did not open"
        results = {}
        for batch in args.batches:
            frame = pd.DataFrame({"image": [jpegs[i % len(jpegs)] for i in range(batch)]})
            times: dict[str, list[float]] = {"off": [], "on": []}
            for state in ("off", "on"):  # warm-up
                python_model.served_log = log if state == "on" else None
                served.predict(frame)
            for _ in range(args.rounds):
                for state in ("off", "on"):
                    python_model.served_log = log if state == "on" else None
                    start = time.perf_counter()
                    for _ in range(args.calls):
                        served.predict(frame)
                    times[state].append((time.perf_counter() - start) / args.calls * 1000)
            off, on = statistics.median(times["off"]), statistics.median(times["on"])
            results[batch] = {"ms_off": round(off, 3), "ms_on": round(on, 3), "ratio": round(on / off, 3),
                              "ratio_per_round": [round(b / a, 3) for a, b in zip(times["off"], times["on"])]}
        python_model.served_log = log
        log.close()
        rows = log.stats
        frames = [read_log(str(tmp / "log")).iloc[:64]] * 1000  # served rows, 64 to a request
        writer = LogWriter(str(tmp / "log-write"))  # params.yaml's batching: its thread writes meanwhile
        start = time.perf_counter()
        for frame in frames:
            writer.write(frame)
        write_us = (time.perf_counter() - start) / len(frames) * 1e6
        writer.close()
        assert writer.stats["rows_written"] == sum(map(len, frames)), writer.stats
    print(json.dumps({
        "cpus": os.cpu_count(), "load_average_1m": round(os.getloadavg()[0], 2), "arch": args.arch,
        "torch_threads": torch.get_num_threads(), "rounds": args.rounds, "calls_per_round": args.calls,
        "latency_ms_median": results, "log": {k: rows[k] for k in ("rows_written", "rows_dropped", "write_errors", "files")},
        "writer_write_us_64_rows": round(write_us, 1),
    }, indent=2))


if __name__ == "__main__":
    main()
