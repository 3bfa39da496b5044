"""Segmentation figures: true and predicted masks over test images, and per-class IoU bars."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from visionops.evaluation.plots import _pyplot, save_figure


IGNORED = (0.0, 0.0, 0.0)  # black: ignored (255) pixels, a colour no class gets
ALPHA = 0.55


def class_colours(k: int) -> list[tuple[float, float, float]]:
    """A distinct colour per class index: tab20's strong colours, then its light ones, without its greys (which an
    image's own grey would hide); golden-ratio hues beyond those 18."""
    import colorsys

    from matplotlib import colormaps

    tab20 = [colormaps["tab20"](i)[:3] for i in (*range(0, 20, 2), *range(1, 20, 2)) if i not in (14, 15)]
    return [tab20[c] if c < len(tab20) else colorsys.hsv_to_rgb((c * 0.618034) % 1, 0.85, 0.9) for c in range(k)]


def _colour(masks: np.ndarray, k: int, background: bool) -> np.ndarray:
    """RGBA colours for class indices (class 0 transparent when it is background; IGNORE black)."""
    rgba = np.zeros((*masks.shape, 4))
    for c, colour in enumerate(class_colours(k)):
        if c or not background:
            rgba[masks == c] = (*colour, ALPHA)
    rgba[masks == 255] = (*IGNORED, ALPHA)
    return rgba


def _legend(fig, shown: set[int], class_names: list[str], background: bool) -> list[str]:
    """One patch per class the overlays show (and ignored pixels), under the figure; their labels."""
    from matplotlib.patches import Patch

    colours = class_colours(len(class_names))
    handles = [Patch(color=(*colours[c], ALPHA), label=class_names[c]) for c in sorted(shown - {255})
               if c < len(class_names) and (c or not background)]
    if 255 in shown:
        handles.append(Patch(color=(*IGNORED, ALPHA), label="ignored (255)"))
    if handles:
        fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 6), fontsize=7, frameon=False)
    return [h.get_label() for h in handles]


def overlays(images: np.ndarray, truth: np.ndarray, pred: np.ndarray, class_names: list[str], path: Path,
             background: bool = True) -> list[str]:
    """One row per image: the image, the true mask over it, the predicted mask over it; a legend of the colours
    shown, whose labels are returned. Class 0 is left transparent (and out of the titles) when it is `background`."""
    plt = _pyplot()
    n = max(len(images), 1)
    fig, axes = plt.subplots(n, 3, figsize=(6, 2 * n + 0.5), squeeze=False)
    first = int(background)
    shown: set[int] = set()
    for i in range(len(images)):
        img = images[i][..., 0] if images.shape[-1] == 1 else images[i]
        for j, (title, mask) in enumerate((("image", None), ("truth", truth[i]), ("prediction", pred[i]))):
            ax = axes[i, j]
            ax.imshow(img, cmap="gray", vmin=0, vmax=255)
            if mask is not None:
                ax.imshow(_colour(mask, len(class_names), background))
                values = {int(v) for v in np.unique(mask)}
                shown |= values
                names = [class_names[c] for c in sorted(values) if first <= c < len(class_names)]
                ax.set_title(f"{title}: {' '.join(names)}", fontsize=8)
            else:
                ax.set_title(title, fontsize=8)
            ax.axis("off")
    fig.tight_layout(rect=(0, 0.5 / (2 * n + 0.5), 1, 1))
    labels = _legend(fig, shown, class_names, background)
    save_figure(fig, path)
    return labels


def per_class_iou(per_class: dict, path: Path, title: str) -> None:
    plt = _pyplot()
    names = list(per_class)
    values = [per_class[c]["iou"] or 0.0 for c in names]
    fig, ax = plt.subplots(figsize=(max(6, 0.5 * len(names) + 2), 3.5))
    ax.bar(names, values)
    ax.set(ylim=(0, 1), ylabel="IoU", title=title)
    ax.grid(axis="y", alpha=0.3)
    save_figure(fig, path)
