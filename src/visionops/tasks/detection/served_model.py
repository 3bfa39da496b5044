"""The code MLflow logs as a visionops detector (models-from-code): loading a registered model runs
this file; the weights are its artifact, read with `torch.load(weights_only=True)` in `load_context`."""

import mlflow

from visionops.tasks.detection.served import ImageDetectorModel

mlflow.models.set_model(ImageDetectorModel())
