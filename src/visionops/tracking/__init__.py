"""Experiment tracking around the stage cores: MLflow runs, lineage tags and the project's store."""
