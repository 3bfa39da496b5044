"""Segmentation figures: true and predicted masks over test images, and per-class IoU bars."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from visionops.evaluation.plots import _pyplot, save_figure


def _colour(masks: np.ndarray, k: int) -> np.ndarray:
    """RGBA colours for class indices (background transparent, IGNORE grey)."""
    from matplotlib import colormaps

    cmap = colormaps["tab10"]
    rgba = np.zeros((*masks.shape, 4))
    for c in range(1, k):
        rgba[masks == c] = (*cmap((c - 1) % 10)[:3], 0.55)
    rgba[masks == 255] = (0.5, 0.5, 0.5, 0.55)
    return rgba


def overlays(images: np.ndarray, truth: np.ndarray, pred: np.ndarray, class_names: list[str], path: Path) -> None:
    """One row per image: the image, the true mask over it, the predicted mask over it."""
    plt = _pyplot()
    n = max(len(images), 1)
    fig, axes = plt.subplots(n, 3, figsize=(6, 2 * n), squeeze=False)
    for i in range(len(images)):
        img = images[i][..., 0] if images.shape[-1] == 1 else images[i]
        for j, (title, mask) in enumerate((("image", None), ("truth", truth[i]), ("prediction", pred[i]))):
            ax = axes[i, j]
            ax.imshow(img, cmap="gray", vmin=0, vmax=255)
            if mask is not None:
                ax.imshow(_colour(mask, len(class_names)))
                shown = [class_names[c] for c in np.unique(mask) if 0 < c < len(class_names)]
                ax.set_title(f"{title}: {' '.join(shown)}", fontsize=8)
            else:
                ax.set_title(title, fontsize=8)
            ax.axis("off")
    fig.tight_layout()
    save_figure(fig, path)


def per_class_iou(per_class: dict, path: Path, title: str) -> None:
    plt = _pyplot()
    names = list(per_class)
    values = [per_class[c]["iou"] or 0.0 for c in names]
    fig, ax = plt.subplots(figsize=(max(6, 0.5 * len(names) + 2), 3.5))
    ax.bar(names, values)
    ax.set(ylim=(0, 1), ylabel="IoU", title=title)
    ax.grid(axis="y", alpha=0.3)
    save_figure(fig, path)
