"""The README's drift history picture: a project's champion served with growing Gaussian noise, one drift window
per noise level, then the drift run's `drift_history.png`.

    python bench/drift_chart.py --project <a project whose champion was registered with its reference> \\
        --out docs/drift_history.png [--sigmas 0,0,0,10,20,30,45,60] [--images 200]

Each window: `--images` test images of the project's data/dataset with noise of sigma (0-255 scale) go through
`visionops predict`'s `predict_paths` (the served model writes the log), then the `drift` flow judges them
(windows_to_trigger is raised for the run, so nothing retrains). Uses Prefect's temporary server unless
PREFECT_API_URL is set.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "src")]


def noisy_pngs(dataset_dir: Path, out: Path, sigma: float, n: int, seed: int) -> Path:
    from PIL import Image

    from visionops.data import dataset

    test = dataset.load(dataset_dir).splits["test"]
    rng = np.random.default_rng(seed)
    out.mkdir(parents=True)
    for i, image in enumerate(np.asarray(test.images[:n])[..., 0]):
        Image.fromarray(np.clip(image + rng.normal(0, sigma, image.shape), 0, 255).astype(np.uint8)).save(out / f"{i}.png")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--project", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--sigmas", default="0,0,0,10,20,30,45,60")
    ap.add_argument("--images", type=int, default=200)
    args = ap.parse_args()
    import mlflow
    import yaml

    from pipelines.drift import HISTORY_CHART, drift
    from visionops.serving.promotion import predict_paths

    project = args.project.resolve()
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["monitor"].update({"windows_to_trigger": 1000, "min_window_rows": min(100, args.images),
                              "window_rows": args.images, "flush_seconds": 0.2})
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    os.environ["VISIONOPS_LOG_URI"] = str(project / "logs" / "inference")
    name = params["mlflow"]["teacher_model_name"]
    with tempfile.TemporaryDirectory() as tmp:
        for window, sigma in enumerate(float(s) for s in args.sigmas.split(",")):
            mlflow.set_tracking_uri(f"sqlite:///{project / 'mlflow.db'}")
            images = noisy_pngs(project / "data" / "dataset", Path(tmp) / str(window), sigma, args.images, window)
            predict_paths(f"models:/{name}@champion", [images], Path(tmp) / f"{window}.csv")
            time.sleep(0.5)
            summary = drift(project_dir=str(project))
            print(f"sigma {sigma:5.1f}: window {summary['window']} {summary['verdict']}, estimate "
                  f"{summary['metrics']['estimate']:.3f} (reference {summary['metrics']['reference_score']:.3f})")
        chart = mlflow.MlflowClient().download_artifacts(summary["mlflow_run_id"], HISTORY_CHART, tmp)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(chart, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
