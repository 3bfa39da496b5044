"""Detection's evaluation figures: precision-recall curves and test images with boxes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from visionops.evaluation.plots import _pyplot, save_figure

TRUE_COLOUR, PRED_COLOUR = "lime", "red"


def pr_curves(curves: dict[str, list[float]], per_class_ap50: dict[str, float], path: Path, title: str) -> None:
    """Precision against recall (COCO's 101 recall points) at IoU .5, one line per class with its AP@.5."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4.5))
    recall = np.linspace(0, 1, 101)
    for name, precision in curves.items():
        ax.plot(recall, precision, label=f"{name} (AP@.5 {per_class_ap50.get(name, float('nan')):.2f})")
    ax.set(xlabel="recall", ylabel="precision", title=title, xlim=(0, 1), ylim=(0, 1.02))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2, loc="lower left")
    save_figure(fig, path)


def _rgb(image_hwc: np.ndarray) -> torch.Tensor:
    x = torch.from_numpy(np.array(image_hwc)).permute(2, 0, 1)
    return x.expand(3, -1, -1) if x.shape[0] == 1 else x


def boxes_drawn(images: np.ndarray, preds: list[dict], true: list[dict], class_names: list[str], path: Path,
                title: str, upscale: int = 4) -> None:
    """A grid of images with true boxes (green, class above) and predicted boxes (red, class:score)
    drawn by `torchvision.utils.draw_bounding_boxes`, upscaled so the labels are readable."""
    from torchvision.utils import draw_bounding_boxes, make_grid

    tiles = []
    for image, p, t in zip(images, preds, true):
        x = torch.nn.functional.interpolate(_rgb(image)[None].float(), scale_factor=upscale, mode="nearest")[0].byte()
        if len(t["labels"]):
            x = draw_bounding_boxes(x, torch.as_tensor(t["boxes"]) * upscale, [class_names[c] for c in t["labels"]],
                                    colors=TRUE_COLOUR, width=2)
        if len(p["labels"]):
            x = draw_bounding_boxes(x, torch.as_tensor(p["boxes"]) * upscale,
                                    [f"{class_names[c]}:{s:.2f}" for c, s in zip(p["labels"], p["scores"])],
                                    colors=PRED_COLOUR, width=1)
        tiles.append(x)
    grid = make_grid(tiles, nrow=min(6, len(tiles)), padding=4, pad_value=255).permute(1, 2, 0).numpy()
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(12, 12 * grid.shape[0] / grid.shape[1] + 0.5))
    ax.imshow(grid)
    ax.set_axis_off()
    ax.set_title(f"{title} (green: true, red: predicted)")
    save_figure(fig, path)
