"""The names `visionops.models` registers, without importing torch: what `visionops check` accepts.

tests/test_config.py keeps these equal to `visionops.models.list_models()` and to what the models build.
"""

MODEL_TASKS = {  # model name -> the task it solves (sorted, as list_models)
    "centernet": "detection",
    "centernet_backbone": "classification",
    "centernet_tiny": "detection",
    "deeplabv3_mobilenet_v3_large": "segmentation",
    "fasterrcnn_mobilenet_v3_large_320_fpn": "detection",
    "fastnet": "classification",
    "fastnet_tiny": "classification",
    "lenet": "classification",
    "lraspp_mobilenet_v3_large": "segmentation",
    "mobilenet_tiny": "classification",
    "mobilenet_v3_large": "classification",
    "resnet": "classification",
    "resnet18": "classification",
    "resnet18_tv": "classification",
    "resnet20": "classification",
    "resnet8": "classification",
    "scatternet": "classification",
    "slim_resnet": "classification",
    "ssdlite320_mobilenet_v3_large": "detection",
    "unet": "segmentation",
    "unet_backbone": "classification",
    "unet_small": "segmentation",
}
MODEL_NAMES = tuple(MODEL_TASKS)
# student -> the teacher it can start from with `distill.init: teacher`: the same network at a larger width,
# which lists its channel groups (`models.narrow`)
NARROWS = {"centernet_tiny": "centernet", "unet_small": "unet"}
MIN_IMAGE_SIZE = {"fastnet": 9, "fastnet_tiny": 9, "lenet": 16, "scatternet": 16}
# models whose ImageNet weights torchvision ships (`train.init: imagenet`): the classifiers' own, the others' backbone's
IMAGENET = ("deeplabv3_mobilenet_v3_large", "fasterrcnn_mobilenet_v3_large_320_fpn", "lraspp_mobilenet_v3_large",
            "mobilenet_v3_large", "resnet18_tv")
NO_CONV = ("scatternet",)  # no nn.Conv2d for evaluate's Grad-CAM, and complex tensors ONNX cannot export (distill)  # others work from the schema's floor, 8


def check_model_name(name: str) -> str:
    """`name` if a model of that name is registered, else a ValueError listing the valid names."""
    if name in MODEL_NAMES:
        return name
    import difflib

    close = difflib.get_close_matches(name, MODEL_NAMES, n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    raise ValueError(f"unknown model {name!r}{hint}; valid models: {', '.join(MODEL_NAMES)}")


def models_for(task: str) -> list[str]:
    """The model names of `task`."""
    return [name for name, t in MODEL_TASKS.items() if t == task]
