"""Prefect orchestration of the visionops DVC pipeline.

- `pipelines.dvc_stages`: stage order from dvc.yaml and running one stage (`dvc repro --single-item`).
- `pipelines.flows`: the `training`, `promotion` and `monitoring` flows.
- `pipelines.deployments`: the scheduled deployments (`training/nightly`, ...) and `prefect.serve`.
- `python -m pipelines --help`: run a flow locally, serve or register the deployments.

Importable when the repository root is on sys.path (it is when commands run from the root).
"""
