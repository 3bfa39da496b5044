"""Served latency with the inference log on vs off: the registered pyfunc's `predict` on CIFAR-10 JPEGs
or scikit-learn's digits.

One registered classifier (`--arch` on CIFAR-10 at 32 x 32 RGB, or on the digits at params.yaml's 16 x 16
grey, sent as PNGs; seeded and untrained: latency does not depend on the weights) with its reference profile, in an MLflow SQLite store in a temporary folder, loaded
once through `mlflow.pyfunc.load_model` with the log on (a local folder). Rounds alternate between the log
off (the served model's log detached) and on, in one process, so both see the same load; each round times
`--calls` predicts of a batch of base64 images as `mlflow models serve` receives them. The goal is on/off at
most 1.05 (issue 27). Also reported: the time the log's `record` takes on the request path (after the answer), and the time
`LogWriter.write` of 64 built rows takes in a caller's thread.

    python bench/bench_inference_log.py [--batches 64 1] [--rounds 10] [--calls 20] [--arch resnet20]
        [--data cifar10] [--defer]
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


def images_of(tmp: Path, data: str, per_class: int) -> tuple[dataset.Split, list[str], list[str]]:
    """(the split, its class names, each image base64-encoded as sent): CIFAR-10 JPEGs as extracted, or the
    first `per_class` digits of each class at params.yaml's 16 x 16 grey, as PNGs."""
    from PIL import Image

    from visionops.config import DataConfig
    from visionops.data import dataset
    from visionops.data.sources import digits
    from visionops.serving.pyfunc import encode_png

    if data == "digits":
        split = digits.load(DataConfig(source="digits", image_size=16, channels=1)).splits["train"]
        keep = np.concatenate([np.flatnonzero(split.labels == c)[:per_class] for c in range(10)])
        images, labels = split.images[keep], split.labels[keep]
        return dataset.Split(images, labels, [f"digit-{i}" for i in keep]), [str(c) for c in range(10)], \
            [encode_png(im) for im in images]
    files = sorted(extract_cifar(tmp / "cifar", per_class=per_class).glob("train/*/*.jpg"))
    classes = sorted({f.parent.name for f in files})
    images = np.stack([np.asarray(Image.open(f).convert("RGB")) for f in files])
    labels = np.array([classes.index(f.parent.name) for f in files])
    return dataset.Split(images, labels, [str(f) for f in files]), classes, \
        [base64.b64encode(f.read_bytes()).decode() for f in files]


def register(tmp: Path, arch: str, data: str, per_class: int) -> tuple[str, list[str]]:
    """A registered classifier with its profile (the requests' images as its val split); (model URI, base64 images)."""
    import mlflow
    import torch

    from visionops.config import MonitorConfig
    from visionops.data import dataset
    from visionops.monitoring import reference
    from visionops.tasks import get_task
    from visionops.tasks.classification import classifier

    split, classes, sent = images_of(tmp, data, per_class)
    shape = split.images.shape[1:]
    dataset.save(dataset.Dataset(classes, {"train": split, "val": split, "test": split}, data), tmp / "ds")
    torch.manual_seed(0)
    mean, std = classifier.channel_stats(split.images)
    classifier.save(tmp / "model.pt", classifier.build(arch, classes, shape, mean, std).eval(), arch, classes, shape)
    mlflow.set_tracking_uri(f"sqlite:///{tmp / 'mlflow.db'}")
    mlflow.set_experiment("bench")
    settings = MonitorConfig(log_uri=str(tmp / "log")).model_dump()
    with mlflow.start_run():
        profile = reference.build("classification", tmp / "model.pt", tmp / "ds", settings, tmp / "profile", "bench")
        version = get_task("classification").log_model(tmp / "model.pt", "bench", {}, None, profile)
    return f"models:/bench/{version.version}", sent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batches", type=int, nargs="+", default=[64, 1])
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--calls", type=int, default=20)
    ap.add_argument("--arch", default="resnet20")
    ap.add_argument("--data", choices=["cifar10", "digits"], default="cifar10")
    ap.add_argument("--defer", action="store_true",
                    help="the writer's thread idle until the timing ends (flush_rows and flush_seconds past the run): "
                         "the request path's own cost, without the building and writing competing for the CPUs")
    ap.add_argument("--per-class", type=int, default=10, help="images per class (the requests and the reference)")
    args = ap.parse_args()
    import mlflow
    import pandas as pd
    import torch

    from visionops.monitoring.inference_log import LogWriter, read_log

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    with tempfile.TemporaryDirectory(prefix="bench-inference-log-") as tmp:
        tmp = Path(tmp)
        uri, jpegs = register(tmp, args.arch, args.data, args.per_class)
        os.environ["VISIONOPS_LOG_URI"] = str(tmp / "log")
        served = mlflow.pyfunc.load_model(uri)
        python_model = served.unwrap_python_model()
        log = python_model.served_log
        assert log is not None, "the inference log did not open"
        if args.defer:
            log.writer.flush_rows, log.writer.flush_seconds = log.writer.queue_rows, 1e6
        record, spent = log.record, []

        def timed(*args, **kwargs) -> None:  # what the log costs on the request path, after the answer
            start = time.perf_counter()
            record(*args, **kwargs)
            spent.append(time.perf_counter() - start)

        log.record = timed
        results = {}
        for batch in args.batches:
            frame = pd.DataFrame({"image": [jpegs[i % len(jpegs)] for i in range(batch)]})
            times: dict[str, list[float]] = {"off": [], "on": []}
            spent.clear()
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
                              "ratio_per_round": [round(b / a, 3) for a, b in zip(times["off"], times["on"])],
                              "record_us_median": round(statistics.median(spent) * 1e6, 1)}
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
        "cpus": os.cpu_count(), "load_average_1m": round(os.getloadavg()[0], 2), "arch": args.arch, "data": args.data, "defer": args.defer,
        "torch_threads": torch.get_num_threads(), "rounds": args.rounds, "calls_per_round": args.calls,
        "latency_ms_median": results, "log": {k: rows[k] for k in ("rows_written", "rows_dropped", "write_errors", "files", "failed_rows")},
        "writer_write_us_64_rows": round(write_us, 1),
    }, indent=2))


if __name__ == "__main__":
    main()
