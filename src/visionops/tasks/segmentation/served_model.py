"""The code MLflow logs as a visionops segmenter (models-from-code): loading a registered model runs this
file; the weights are its artifact, read with `torch.load(weights_only=True)`."""

import mlflow

from visionops.tasks.segmentation.serving import SegmenterModel

mlflow.models.set_model(SegmenterModel())
