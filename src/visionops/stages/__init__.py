"""The pipeline stages: one module per DVC stage, each with a plain `run_<stage>` core that the CLI wraps."""
