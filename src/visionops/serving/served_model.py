"""The code MLflow logs as a visionops model (models-from-code): loading a registered model runs
this file, from the visionops copy in the model's code/ folder, instead of unpickling an object.
The weights are the model's artifact, read with `torch.load(weights_only=True)` in `load_context`."""

import mlflow

from visionops.serving.pyfunc import ImageClassifierModel

mlflow.models.set_model(ImageClassifierModel())
