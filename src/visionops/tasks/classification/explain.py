"""Grad-CAM explanations (pytorch-grad-cam) and image grids of right and wrong predictions.

The target layer is the last `nn.Conv2d` inside `model.net`, which works for every registered
architecture (skipping convs whose output is 1 x 1 at the image size, where Grad-CAM is constant). Grad-CAM runs on a private copy of the model with in-place activations turned off
(an in-place ReLU right after the target conv would overwrite the hooked activation), so the
caller's model is never touched.
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import torch
from torch import nn

from visionops.evaluation.plots import _pyplot, save_figure

GRID_COLUMNS = 4  # samples per row of a Grad-CAM grid (two panels each)
GALLERY_COLUMNS = 6


def target_layer(model: nn.Module, image_shape: tuple[int, int, int] | None = None) -> nn.Conv2d:
    """The last nn.Conv2d (in registration order) of `model.net` (or of `model` if it has no .net).

    With `image_shape` (H, W, C), a conv whose output is 1 x 1 at that size is skipped in favour of
    the last one with a spatial map (Grad-CAM of a 1 x 1 map is a constant); e.g. fastnet at 16 x 16.
    """
    net = getattr(model, "net", model)
    convs = [m for m in net.modules() if isinstance(m, nn.Conv2d)]
    if not convs:
        raise ValueError(f"{type(net).__name__} has no nn.Conv2d layer for Grad-CAM")
    if image_shape is None:
        return convs[-1]
    h, w, c = image_shape
    areas: dict[int, int] = {}

    def record(module, _inputs, output):
        areas[id(module)] = output.shape[-2] * output.shape[-1]

    hooks = [m.register_forward_hook(record) for m in convs]
    was_training = model.training
    try:
        param = next(model.parameters(), None)
        x = torch.zeros(1, c, h, w, device=param.device if param is not None else "cpu")
        with torch.no_grad():
            model.eval()(x)
    finally:
        model.train(was_training)
        for hook in hooks:
            hook.remove()
    spatial = [m for m in convs if areas.get(id(m), 0) > 1]
    return spatial[-1] if spatial else convs[-1]


def _camable_copy(model: nn.Module, device: torch.device) -> nn.Module:
    model = copy.deepcopy(model).to(device).eval()
    for m in model.modules():
        if getattr(m, "inplace", False) is True:
            m.inplace = False
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def gradcam_maps(
    model: nn.Module, images_nhwc, targets, device: torch.device | str = "cpu", batch_size: int = 64
) -> np.ndarray:
    """Grad-CAM heat-maps (N x H x W float32, each scaled to [0, 1]) for uint8 N x H x W x C images.

    `targets` are the class indices to explain (e.g. the predicted classes).
    """
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    device = torch.device(device)
    images = np.asarray(images_nhwc)
    targets = [int(t) for t in np.asarray(targets).reshape(-1)]
    if len(images) != len(targets):
        raise ValueError(f"{len(images)} images but {len(targets)} targets")
    n, h, w = images.shape[:3]
    if n == 0:
        return np.zeros((0, h, w), np.float32)
    net = _camable_copy(model, device)
    out = []
    with GradCAM(model=net, target_layers=[target_layer(net, (h, w, images.shape[3]))]) as cam, torch.enable_grad():
        for start in range(0, n, batch_size):
            chunk = torch.from_numpy(np.ascontiguousarray(images[start : start + batch_size]))
            x = chunk.permute(0, 3, 1, 2).float().div(255).to(device)
            t = [ClassifierOutputTarget(c) for c in targets[start : start + batch_size]]
            out.append(np.asarray(cam(input_tensor=x, targets=t), dtype=np.float32))
    maps = np.concatenate(out).reshape(n, h, w)
    return np.nan_to_num(np.clip(maps, 0.0, 1.0))


def to_rgb(image_hwc: np.ndarray) -> np.ndarray:
    """uint8 H x W x {1,3} → uint8 H x W x 3 (greyscale replicated)."""
    image = np.asarray(image_hwc)
    if image.ndim == 2:
        image = image[..., None]
    return np.repeat(image, 3, axis=2) if image.shape[2] == 1 else image[..., :3]


def overlay(image_hwc: np.ndarray, cam: np.ndarray, image_weight: float = 0.5) -> np.ndarray:
    """The heat-map (jet colours) blended over the image: uint8 H x W x 3."""
    from matplotlib import colormaps

    heat = colormaps["jet"](np.clip(cam, 0, 1))[..., :3]
    rgb = to_rgb(image_hwc).astype(np.float32) / 255
    return np.uint8(np.clip(255 * ((1 - image_weight) * heat + image_weight * rgb), 0, 255))


def show_image(ax, image_hwc: np.ndarray) -> None:
    """imshow that draws greyscale as grey (not a false-colour map) at true 0..255 levels."""
    image = np.asarray(image_hwc)
    if image.ndim == 3 and image.shape[2] == 1:
        ax.imshow(image[..., 0], cmap="gray", vmin=0, vmax=255, interpolation="nearest")
    else:
        ax.imshow(image, interpolation="nearest")
    ax.set_axis_off()


def _caption(true: str, pred: str, confidence: float) -> str:
    return f"true: {true}\npred: {pred} ({confidence:.2f})"


def _empty_figure(path: Path, title: str, message: str) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(4, 1.5))
    ax.text(0.5, 0.5, message, ha="center", va="center")
    ax.set_axis_off()
    fig.suptitle(title)
    save_figure(fig, path)


def gradcam_grid(
    images_nhwc, cams: np.ndarray, true_names: list[str], pred_names: list[str], confidences, path: Path, title: str
) -> None:
    """One PNG: per sample the image (captioned true/pred/confidence) and its Grad-CAM overlay."""
    n = len(true_names)
    if n == 0:
        _empty_figure(path, title, "no images in this group")
        return
    plt = _pyplot()
    cols = min(GRID_COLUMNS, n)
    rows = -(-n // cols)
    fig, axes = plt.subplots(
        rows, 2 * cols, figsize=(2 * 1.6 * cols, 2.1 * rows + 0.4), squeeze=False, layout="constrained"
    )
    for ax in axes.flat:
        ax.set_axis_off()
    for i in range(n):
        r, c = divmod(i, cols)
        image = np.asarray(images_nhwc[i])
        show_image(axes[r, 2 * c], image)
        axes[r, 2 * c].set_title(_caption(true_names[i], pred_names[i], float(confidences[i])), fontsize=7)
        axes[r, 2 * c + 1].imshow(overlay(image, cams[i]), interpolation="nearest")
        axes[r, 2 * c + 1].set_title("Grad-CAM", fontsize=7)
    fig.suptitle(title)
    save_figure(fig, path)


def misclassified_gallery(
    images_nhwc, true_names: list[str], pred_names: list[str], confidences, path: Path, title: str
) -> None:
    """One PNG of misclassified images, each captioned with its true and predicted class."""
    n = len(true_names)
    if n == 0:
        _empty_figure(path, title, "no misclassified images")
        return
    plt = _pyplot()
    cols = min(GALLERY_COLUMNS, n)
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(1.7 * cols, 2.1 * rows + 0.4), squeeze=False, layout="constrained")
    for ax in axes.flat:
        ax.set_axis_off()
    for i in range(n):
        ax = axes.flat[i]
        show_image(ax, np.asarray(images_nhwc[i]))
        ax.set_title(_caption(true_names[i], pred_names[i], float(confidences[i])), fontsize=7)
    fig.suptitle(title)
    save_figure(fig, path)


def select_correct(correct: np.ndarray, n: int, seed: int = 0) -> np.ndarray:
    """Up to n indices of correct predictions: a seeded random sample, in index order."""
    pool = np.flatnonzero(correct)
    if len(pool) <= n:
        return pool
    return np.sort(np.random.default_rng(seed).choice(pool, size=n, replace=False))


def select_wrong(correct: np.ndarray, confidence: np.ndarray, n: int) -> np.ndarray:
    """Up to n indices of wrong predictions, most confident mistakes first (ties by index)."""
    pool = np.flatnonzero(~np.asarray(correct, bool))
    order = np.argsort(-np.asarray(confidence)[pool], kind="stable")
    return pool[order][:n]


def explain_predictions(
    model: nn.Module,
    images_nhwc,
    labels: np.ndarray,
    probs: np.ndarray,
    class_names: list[str],
    out_dir: Path,
    samples: int,
    gallery_size: int,
    device: torch.device | str = "cpu",
    seed: int = 0,
) -> dict:
    """Write gradcam_correct.png, gradcam_wrong.png and misclassified.png into out_dir.

    Grad-CAM explains the predicted class. Correct samples are a seeded random choice; wrong ones
    (and the gallery) are the most confident mistakes. Returns the chosen test indices per file.
    """
    out_dir = Path(out_dir)
    labels = np.asarray(labels, dtype=np.int64)
    probs = np.asarray(probs)
    pred = probs.argmax(1)
    conf = probs.max(1)
    correct = pred == labels
    names = np.asarray(class_names, dtype=object)
    chosen = {
        "gradcam_correct.png": select_correct(correct, samples, seed),
        "gradcam_wrong.png": select_wrong(correct, conf, samples),
    }
    for file, idx in chosen.items():
        imgs = np.asarray(images_nhwc[idx])
        cams = gradcam_maps(model, imgs, pred[idx], device)
        kind = "correctly" if file == "gradcam_correct.png" else "wrongly"
        gradcam_grid(
            imgs,
            cams,
            list(names[labels[idx]]),
            list(names[pred[idx]]),
            conf[idx],
            out_dir / file,
            f"Grad-CAM of the predicted class: {len(idx)} {kind} classified test images",
        )
    gallery = select_wrong(correct, conf, gallery_size)
    misclassified_gallery(
        np.asarray(images_nhwc[gallery]),
        list(names[labels[gallery]]),
        list(names[pred[gallery]]),
        conf[gallery],
        out_dir / "misclassified.png",
        f"Misclassified test images ({len(gallery)} of {int((~correct).sum())}, most confident first)",
    )
    chosen["misclassified.png"] = gallery
    return {k: [int(i) for i in v] for k, v in chosen.items()}
