"""A log row's embedding: the network's pooled features, captured during the forward pass the answer runs
(never a second one), projected to `monitor.embedding_dim` dimensions by the model version's projection.

The features are the output of the last module of the architecture's encoder (`models.encoders`), global
average pooled; an architecture without an encoder entry uses its equivalent penultimate module
(`PENULTIMATE`), else the input of its last linear layer (a classifier's head). The projection is a PCA of
the validation split's features, fitted at registration and stored with the version as an .npz (`mean` (D,),
`components` (D, k)): embedding = (features - mean) @ components.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from visionops.errors import InvalidInputError

PENULTIMATE = {"ssdlite320_mobilenet_v3_large": "net.backbone.features"}  # relative to the bare network


def feature_module(net: nn.Module, arch: str) -> tuple[nn.Module, bool]:
    """(the module whose output (True) or input (False) holds `net`'s features for `arch`); an
    InvalidInputError names an architecture with none of the three."""
    from visionops.models.encoders import ENCODERS, encoder

    if arch in ENCODERS:
        return list(encoder(net, arch).children())[-1], True
    if arch in PENULTIMATE:
        module = net.get_submodule(PENULTIMATE[arch])
        return (list(module.children())[-1] if isinstance(module, nn.Sequential) else module), True
    linear = [m for m in net.modules() if isinstance(m, nn.Linear)]
    if linear:
        return linear[-1], False
    raise InvalidInputError(f"model {arch!r}: no encoder, penultimate module or linear head to take the logged "
                            "embedding from (add it to visionops.monitoring.embedding.PENULTIMATE)")


def _pooled(x) -> Tensor:
    x = x[0] if isinstance(x, tuple) else x
    x = x.detach().float()
    return x.mean(dim=(2, 3)) if x.ndim == 4 else x.flatten(1)


class Capture:
    """`reduce` of a module's output (or input) in every forward pass run inside `capture()`, in this thread
    only (concurrent requests of a scoring server each see their own)."""

    def __init__(self, module: nn.Module, reduce, output: bool = True):
        self._local, self._reduce = threading.local(), reduce
        if output:
            module.register_forward_hook(lambda _m, _inp, out: self._add(out))
        else:
            module.register_forward_pre_hook(lambda _m, inp: self._add(inp))

    def _add(self, x) -> None:
        seen = getattr(self._local, "seen", None)
        if seen is not None:
            seen.append(self._reduce(x).cpu())

    @contextmanager
    def capture(self) -> Iterator[list[Tensor]]:
        """A list that receives one (batch, ...) tensor per forward pass while inside."""
        self._local.seen = seen = []
        try:
            yield seen
        finally:
            self._local.seen = None


def feature_capture(net: nn.Module, arch: str) -> Capture:
    """A `Capture` of `net`'s pooled features (`feature_module`), (batch, D) per pass."""
    module, output = feature_module(net, arch)
    return Capture(module, _pooled, output)


def first_passes(seen: list[Tensor], passes: int = 1) -> np.ndarray:
    """The (N, D) features of the first of every `passes` consecutive forward passes (a batch's un-flipped,
    unshifted view when test-time augmentation ran the network `passes` times per batch)."""
    kept = seen[::passes]
    return torch.cat(kept).numpy() if kept else np.zeros((0, 0), np.float32)


@dataclass(frozen=True)
class Projection:
    mean: np.ndarray  # (D,)
    components: np.ndarray  # (D, k)

    def __call__(self, features: np.ndarray) -> np.ndarray:
        return ((np.asarray(features, np.float32) - self.mean) @ self.components).astype(np.float32)

    def save(self, path: Path) -> None:
        with open(path, "wb") as fh:
            np.savez(fh, mean=self.mean, components=self.components)

    @classmethod
    def load(cls, path: Path | str) -> Projection:
        with np.load(path, allow_pickle=False) as z:
            return cls(z["mean"].astype(np.float32), z["components"].astype(np.float32))


def fit_projection(features: np.ndarray, dim: int) -> Projection:
    """The PCA of `features` (N, D) to min(dim, D, N) components (numpy's SVD), each component's sign fixed
    so its largest coefficient is positive (the same features give the same projection)."""
    x = np.asarray(features, np.float64)
    if x.ndim != 2 or len(x) == 0:
        raise InvalidInputError(f"fitting the embedding projection needs (N, D) features with N > 0; got shape {x.shape}")
    mean = x.mean(0)
    _, _, vt = np.linalg.svd(x - mean, full_matrices=False)
    comps = vt[: min(dim, *x.shape)].T
    signs = np.sign(comps[np.abs(comps).argmax(0), np.arange(comps.shape[1])])
    comps *= np.where(signs == 0, 1.0, signs)
    return Projection(mean.astype(np.float32), comps.astype(np.float32))
