"""The names `visionops.models` registers, without importing torch: what `visionops check` accepts.

tests/test_config.py keeps these equal to `visionops.models.list_models()` and to what the models build.
"""

MODEL_NAMES = (
    "fastnet",
    "fastnet_tiny",
    "lenet",
    "mobilenet_tiny",
    "resnet",
    "resnet18",
    "resnet20",
    "resnet8",
    "slim_resnet",
)
MIN_IMAGE_SIZE = {"fastnet": 9, "fastnet_tiny": 9, "lenet": 16}  # others work from the schema's floor, 8


def check_model_name(name: str) -> str:
    """`name` if a model of that name is registered, else a ValueError listing the valid names."""
    if name in MODEL_NAMES:
        return name
    import difflib

    close = difflib.get_close_matches(name, MODEL_NAMES, n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    raise ValueError(f"unknown model {name!r}{hint}; valid models: {', '.join(MODEL_NAMES)}")
