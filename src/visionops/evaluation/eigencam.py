"""EigenCAM figures (pytorch-grad-cam) for models that answer per pixel: detectors' heatmaps, segmenters' logits.

EigenCAM (Muhammad & Yeasin 2020) maps the first principal component of a layer's activations: it needs no
gradients and no target class, so it explains a detector or a segmenter as cheaply as one forward pass.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from visionops.evaluation.plots import _pyplot, save_figure


class _ClassScores(nn.Module):
    """pytorch-grad-cam wants N x K outputs: the strongest per-pixel value of each class map."""

    def __init__(self, model: nn.Module, class_maps: Callable[[Tensor], Tensor]):
        super().__init__()
        self.model, self.class_maps = model, class_maps

    def forward(self, x: Tensor) -> Tensor:
        return self.class_maps(self.model(x)).amax((2, 3))


def orient_to_objects(maps: np.ndarray, objects: np.ndarray) -> np.ndarray:
    """Maps in [0, 1] (N x H x W), each turned (1 - map) where its objects (bool N x H x W) are cooler than the rest."""
    out = np.array(maps, copy=True)
    for i, where in enumerate(np.asarray(objects, bool)):
        if where.any() and (~where).any() and out[i][where].mean() < out[i][~where].mean():
            out[i] = 1 - out[i]
    return out


def eigencam(model: nn.Module, layer: nn.Module, images: np.ndarray, path: Path, title: str,
             class_maps: Callable[[Tensor], Tensor] = lambda out: out, objects: np.ndarray | None = None) -> None:
    """Draw `images` (uint8 N x H x W x C) over their EigenCAM maps of `layer`, a module of `model` (which
    takes float N x C x H x W in [0, 1]); `class_maps` picks the N x K x h x w class maps from its output.

    A principal component's sign is arbitrary, so a map may light up the background instead of the objects;
    with `objects` (bool N x H x W, where the model found objects) each map is turned so that they are hot."""
    from pytorch_grad_cam import EigenCAM
    from pytorch_grad_cam.utils.image import show_cam_on_image

    x = torch.from_numpy(np.array(images)).permute(0, 3, 1, 2).float() / 255
    with EigenCAM(_ClassScores(model, class_maps).eval(), target_layers=[layer]) as cam:
        maps = cam(input_tensor=x, targets=None)  # each scaled to [0, 1]
    if objects is not None:
        maps = orient_to_objects(maps, objects)
    rgb = np.repeat(images, 3, -1) if images.shape[-1] == 1 else images
    overlays = [show_cam_on_image(im.astype(np.float32) / 255, m, use_rgb=True) for im, m in zip(rgb, maps)]
    plt = _pyplot()
    fig, axes = plt.subplots(2, len(images), figsize=(1.6 * len(images), 3.4), squeeze=False)
    for i, (im, ov) in enumerate(zip(rgb, overlays)):
        axes[0, i].imshow(im)
        axes[1, i].imshow(ov)
        for ax in axes[:, i]:
            ax.set_axis_off()
    fig.suptitle(title)
    save_figure(fig, path)
