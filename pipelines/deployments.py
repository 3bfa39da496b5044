"""Deployments of the visionops flows, defined in code (the cron comes from params.yaml).

- `training/nightly`: scheduled retraining on params.yaml `schedule.cron` in `schedule.timezone`, with
  `refresh_data=True` (the data source is fetched again; stages rerun only if something changed).
- `promotion/manual`: the metric-gated promotion alone; no schedule (run it from the UI or
  `prefect deployment run promotion/manual`).
- `monitoring/daily`: the champion on the newest data, daily at params.yaml `schedule.monitor_cron` (after the nightly
  retraining), in the same timezone.
- `drift/hourly`: the newest window of the inference log against the champion's reference, on
  `schedule.drift_cron`; persistent drift runs `training/nightly` (pipelines/drift.py).

Locally (what `make schedule` does): a Prefect server on 127.0.0.1 and `python -m pipelines serve`,
i.e. `main()`: `prefect.serve(...)` registers the deployments and runs their flow runs in subprocesses
of this process, one at a time (`limit=1`: training runs share the workspace, so they must not overlap;
monitoring writes only data/monitoring/ and the shared data/cache). Stopping it pauses the schedules; serving again resumes them.

Against a remote Prefect server with a work pool there is no prefect.yaml on purpose: it could not read
the cron from params.yaml, so it would be a second copy of the schedule. `register()` (CLI:
`python -m pipelines deploy --work-pool NAME`) sends the same deployments to the server from source
(`flow.from_source(<checkout or git URL>, "pipelines/flows.py:training").deploy(work_pool_name=NAME)`);
a process worker of that pool runs them, and their schedules stay active when workers stop
(`make services` does all of this on one machine, see infra/services.py):

    export PREFECT_API_URL=http://<server>:4200/api
    prefect work-pool create visionops --type process                 # once
    python -m pipelines deploy --work-pool visionops
    prefect worker start --pool visionops --limit 1   # in the repository root, with .venv/bin on PATH

Without --work-pool, `register()` only creates the deployments (`RunnerDeployment.apply`), which is how
tests check them without starting a worker; their runs then wait for a `serve` process.
"""

from __future__ import annotations

from pathlib import Path

from prefect.deployments.runner import RunnerDeployment
from prefect.schedules import Cron
from prefect.types.entrypoint import EntrypointType

from pipelines.drift import drift
from pipelines.flows import monitoring, promotion, training

ROOT = Path(__file__).resolve().parents[1]
NIGHTLY, PROMOTION, MONITORING, DRIFT = "nightly", "manual", "daily", "hourly"
TAGS = ["visionops"]


def _schedule_params(project_dir: Path):
    from visionops.config import load_params

    return load_params(Path(project_dir) / "params.yaml").schedule


def _specs(project_dir: Path) -> list[tuple]:
    """(flow, deployment name, its keyword arguments) of the deployments."""
    schedule = _schedule_params(project_dir)
    project = {"project_dir": str(project_dir)}
    return [
        (training, NIGHTLY, {
            "schedules": [Cron(schedule.cron, timezone=schedule.timezone)],
            "parameters": {**project, "refresh_data": True, "promote": True},
            "description": f"Scheduled retraining ({schedule.cron}, {schedule.timezone}; params.yaml `schedule`).",
        }),
        (promotion, PROMOTION, {"parameters": project, "description": "Metric-gated promotion, on demand."}),
        (monitoring, MONITORING, {
            "schedules": [Cron(schedule.monitor_cron, timezone=schedule.timezone)],
            "parameters": {**project, "refresh_data": True},
            "description": "The champion's accuracy on the newest data; fails below monitor.min_score.",
        }),
        (drift, DRIFT, {
            "schedules": [Cron(schedule.drift_cron, timezone=schedule.timezone)],
            "parameters": project,
            "description": "The newest inference-log window against the champion's reference; persistent drift "
                           "starts training/nightly.",
        }),
    ]


def build_deployments(project_dir: Path | str = ROOT) -> list[RunnerDeployment]:
    """The deployments as `serve` runs them; their flow runs work in `project_dir` (default: this checkout)."""
    project_dir = Path(project_dir).resolve()
    return [f.to_deployment(name=name, tags=TAGS, entrypoint_type=EntrypointType.MODULE_PATH, **kw)
            for f, name, kw in _specs(project_dir)]


def register(project_dir: Path | str = ROOT, work_pool_name: str | None = None, source: str | None = None) -> list[str]:
    """Create or update the deployments on the server at PREFECT_API_URL; returns their ids.

    With a work pool: each flow is loaded from source (`flow.from_source(source, "pipelines/<module>.py:<flow>")`,
    by default this checkout, whose path every worker machine must have; or a git URL, cloned per run) and
    deployed to the pool, where a worker runs it; its schedules stay active whether or not a worker is up.
    Without: `apply()` only (their runs then wait for a `serve` process)."""
    project_dir = Path(project_dir).resolve()
    if not work_pool_name:
        return [str(d.apply()) for d in build_deployments(project_dir)]
    ids = []
    for f, name, kw in _specs(project_dir):
        entrypoint = f"{f.fn.__module__.replace('.', '/')}.py:{f.fn.__name__}"  # pipelines/flows.py:training
        remote = f.from_source(source=source or str(ROOT), entrypoint=entrypoint)
        ids.append(str(remote.deploy(name=name, work_pool_name=work_pool_name, tags=TAGS, build=False, push=False,
                                     print_next_steps=False, ignore_warnings=True, **kw)))
    return ids


def main(project_dir: Path | str = ROOT) -> None:
    """Serve the deployments from this process (what `make schedule` runs)."""
    from prefect import serve

    serve(*build_deployments(project_dir), limit=1)


if __name__ == "__main__":
    main()
