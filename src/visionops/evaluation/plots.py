"""Matplotlib figures written as PNG (headless, atomically)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from visionops.atomic import atomic_path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format=Path(path).suffix.lstrip(".") or "png", dpi=120, bbox_inches="tight")
    _pyplot().close(fig)


def training_curves(history: list[dict], path: Path, title: str) -> None:
    """Loss and the selection metric (accuracy, or the task's val_<metric>) per epoch, train against val."""
    plt = _pyplot()
    epochs = [r["epoch"] for r in history]
    metric = next(k[4:] for k in history[0] if k.startswith("val_") and k != "val_loss")
    name = "accuracy" if metric == "acc" else metric
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 3.5))
    for split in ("train", "val"):
        ax_loss.plot(epochs, [r[f"{split}_loss"] for r in history], marker="o", label=split)
        if f"{split}_{metric}" in history[0]:
            ax_acc.plot(epochs, [r[f"{split}_{metric}"] for r in history], marker="o", label=split)
    ax_loss.set(xlabel="epoch", ylabel="loss", title="loss")
    ax_acc.set(xlabel="epoch", ylabel=name, title=name)
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    save_figure(fig, path)
