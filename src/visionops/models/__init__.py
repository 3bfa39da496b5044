"""Image classifiers, built by name: `create_model("resnet20", in_channels=3, num_classes=10, image_size=32)`."""

from visionops.models import backbones, detection, fastnet, lenet, mobilenet, resnet, scatternet, segmentation  # noqa: F401  (registers the models)
from visionops.models.registry import count_parameters, create_model, list_models, register_model

__all__ = ["count_parameters", "create_model", "list_models", "register_model"]
