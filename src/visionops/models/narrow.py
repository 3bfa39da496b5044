"""Start a narrow network from a wider one of the same design: its strongest channels (network slimming).

A network that can be narrowed lists its channel groups: the tensor dimensions that index one set of feature
channels (a conv's outputs, its batch norm, and the next layers' inputs) must keep the same channels. Each
group keeps the channels whose batch-norm scales are largest in magnitude (Liu et al. 2017, "Learning
Efficient Convolutional Networks through Network Slimming"), as many as the narrow network has there.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

BN_TENSORS = ("weight", "bias", "running_mean", "running_var")


@dataclass(frozen=True)
class ChannelGroup:
    """One set of channels: `score` names the batch norm whose |scale| ranks them; `members` lists every
    (state-dict key, dimension) that indexes them."""

    score: str
    members: tuple[tuple[str, int], ...]


def conv_bn_groups(feeds: dict[str, list[tuple[str, int]]]) -> list[ChannelGroup]:
    """One group per `conv_bn_relu` block named in `feeds`: its conv's output channels, its batch norm (which
    ranks them), and the (key, dimension) pairs of the layers its output feeds."""
    return [ChannelGroup(f"{name}.1", ((f"{name}.0.weight", 0), *((f"{name}.1.{t}", 0) for t in BN_TENSORS), *inputs))
            for name, inputs in feeds.items()]


def can_narrow(model: nn.Module) -> bool:
    return callable(getattr(model, "channel_groups", None))


def narrow_into(wide: nn.Module, narrow: nn.Module) -> None:
    """Load into `narrow` the strongest channels of `wide`, a network of the same design at a larger width.

    Raises ValueError, naming the tensor, when the two are not the same design."""
    if not can_narrow(wide):
        raise ValueError(f"{type(wide).__name__} does not list its channel groups, so it cannot be narrowed")
    source, target = wide.state_dict(), narrow.state_dict()
    picks: dict[str, dict[int, torch.Tensor]] = {}
    for group in wide.channel_groups():
        key, dim = group.members[0]
        keep = torch.topk(source[f"{group.score}.weight"].abs(), target[key].shape[dim]).indices.sort().values
        for key, dim in group.members:
            picks.setdefault(key, {})[dim] = keep
    state = {}
    for key, tensor in source.items():
        for dim, keep in picks.get(key, {}).items():
            tensor = tensor.index_select(dim, keep)
        if key not in target or tensor.shape != target[key].shape:
            raise ValueError(f"{key}: {tuple(tensor.shape)} from the wide network does not fit the narrow one "
                             f"({tuple(target[key].shape) if key in target else 'absent'}): not the same design")
        state[key] = tensor.clone()
    narrow.load_state_dict(state)
