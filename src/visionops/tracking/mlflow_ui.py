"""`make ui`: MLflow's UI on the project's store, started lean, with a link straight to the runs.

MLflow 3's UI opens on its GenAI overview; the classic view of runs (metrics, params, Compare) is the
experiment's Runs tab in the "Model training" workflow, which the printed link opens directly
(`#/experiments/<id>/runs?workflowType=machine_learning`). visionops experiments are also tagged
`mlflow.experimentKind=custom_model_development`, so the UI shows them as model training.
The server runs one worker and no GenAI job runner (MLflow's defaults start 4 workers plus job
processes: 17 processes and 2.5 GB, whose workers died under load).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

EXPERIMENT_KIND_TAG, EXPERIMENT_KIND = "mlflow.experimentKind", "custom_model_development"


def runs_url(base: str, experiment_id: str) -> str:
    return f"{base.rstrip('/')}/#/experiments/{experiment_id}/runs?workflowType=machine_learning"


def server_command(uri: str, host: str, port: int) -> list[str]:
    search = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])  # this venv's first
    mlflow = shutil.which("mlflow", path=search)
    return [mlflow or "mlflow", "ui", "--backend-store-uri", uri, "--host", host, "--port", str(port), "--workers", "1"]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m visionops.tracking.mlflow_ui", description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=5000)
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--print-only", action="store_true", help="print the link and the command, start nothing")
    args = parser.parse_args(argv)
    from visionops.process_settings import no_analytics

    no_analytics()  # before `import mlflow`, which reads it; the server below inherits it
    import mlflow

    from visionops.config import load_params
    from visionops.tracking.store import configure, tracking_uri

    cfg = load_params(args.params).mlflow
    experiment_id = configure(cfg)  # the experiment exists (and is tagged) even before the first run
    client = mlflow.MlflowClient()
    if client.get_experiment(experiment_id).tags.get(EXPERIMENT_KIND_TAG) is None:  # a store made before the tag
        client.set_experiment_tag(experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
    command = server_command(tracking_uri(cfg), args.host, args.port)
    link = runs_url(f"http://{args.host}:{args.port}", experiment_id)
    print(f"MLflow UI, runs of experiment {cfg.experiment!r}: {link}")
    print(f"  (the classic view: Experiments > {cfg.experiment} > Runs; tick runs and press Compare)", flush=True)
    if args.print_only:
        print(" ".join(command))
        return
    os.execvpe(command[0], command, {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})


if __name__ == "__main__":
    main()
