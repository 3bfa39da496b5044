"""Name → model builder registry, in the style of timm's `register_model` / `create_model`."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from visionops.errors import InvalidInputError

ModelBuilder = Callable[..., nn.Module]

_MODELS: dict[str, ModelBuilder] = {}
_TASKS: dict[str, str] = {}  # model name -> the task it solves


def register_model(fn: ModelBuilder | None = None, *, task: str = "classification"):
    """Register `fn` under its name for `task` (`@register_model` or `@register_model(task="detection")`);
    it is called as fn(in_channels=, num_classes=, image_size=, **kwargs)."""

    def add(fn: ModelBuilder) -> ModelBuilder:
        if fn.__name__ in _MODELS:
            raise ValueError(f"model {fn.__name__!r} is already registered")
        _MODELS[fn.__name__], _TASKS[fn.__name__] = fn, task
        return fn

    return add if fn is None else add(fn)


def list_models(task: str | None = None) -> list[str]:
    """The registered model names (of `task`, when given), sorted."""
    return sorted(name for name in _MODELS if task is None or _TASKS[name] == task)


def model_task(name: str) -> str:
    """The task the model `name` solves."""
    return _TASKS[name]


def create_model(name: str, *, in_channels: int, num_classes: int, image_size: int, **kwargs) -> nn.Module:
    """Build a registered model: (N, in_channels, H, W) normalised floats → (N, num_classes) logits."""
    try:
        builder = _MODELS[name]
    except KeyError:
        raise InvalidInputError(f"unknown model {name!r}; known models: {', '.join(list_models())}") from None
    return builder(in_channels=in_channels, num_classes=num_classes, image_size=image_size, **kwargs)


def count_parameters(model: nn.Module) -> int:
    """The number of scalar parameters in `model`."""
    return sum(p.numel() for p in model.parameters())
