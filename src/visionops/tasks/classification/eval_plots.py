"""Evaluation figures (PNG, headless, atomic): reliability diagram, per-class accuracy (DVC draws the confusion
matrix from predictions.csv)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from visionops.evaluation.plots import _pyplot, save_figure


def _tick_kwargs(n: int) -> dict:
    return {"rotation": 45, "ha": "right"} if n > 6 else {}


def _reliability_panel(ax, bins: dict, label: str, ece: float) -> None:
    edges = np.asarray(bins["edges"])
    width = np.diff(edges)
    filled = np.asarray(bins["count"]) > 0
    acc = np.where(filled, bins["accuracy"], 0.0)
    conf = np.where(filled, bins["confidence"], 0.0)
    ax.bar(edges[:-1], acc, width, align="edge", color="tab:blue", edgecolor="black", linewidth=0.5, label="accuracy")
    gap_lo = np.minimum(acc, conf)
    ax.bar(
        edges[:-1][filled],
        np.abs(conf - acc)[filled],
        width[filled],
        bottom=gap_lo[filled],
        align="edge",
        color="tab:red",
        alpha=0.3,
        edgecolor="tab:red",
        hatch="//",
        linewidth=0.5,
        label="gap to confidence",
    )
    ax.plot([0, 1], [0, 1], "k--", linewidth=1, label="perfect calibration")
    ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="confidence", ylabel="accuracy", title=f"{label}\nECE = {ece:.4f}")
    ax.set_aspect("equal")
    ax.legend(loc="upper left", fontsize=7)


def reliability_diagram(
    before: dict, after: dict, ece_before: float, ece_after: float, temperature: float, path: Path
) -> None:
    """Side-by-side reliability diagrams (accuracy per confidence bin), before and after temperature scaling.

    `before` / `after` are `calibration.reliability_bins` results.
    """
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 5))
    _reliability_panel(axes[0], before, "uncalibrated (T = 1)", ece_before)
    _reliability_panel(axes[1], after, f"temperature scaled (T = {temperature:.3f})", ece_after)
    fig.suptitle("Reliability diagram (test split)")
    fig.tight_layout()
    save_figure(fig, path)


def per_class_accuracy(
    class_names: list[str],
    accuracies,
    supports,
    path: Path,
    overall: float | None = None,
    title: str = "Per-class accuracy",
) -> None:
    """Bar per class of the fraction of its test images classified correctly (None/NaN = no images)."""
    plt = _pyplot()
    n = len(class_names)
    acc = np.array([np.nan if a is None else float(a) for a in accuracies], dtype=float)
    fig, ax = plt.subplots(figsize=(max(6, 0.5 * n + 2), 4))
    x = np.arange(n)
    bars = ax.bar(x, np.nan_to_num(acc), color="tab:blue")
    for bar, a, s in zip(bars, acc, supports):
        text = "n/a" if np.isnan(a) else f"{a:.2f}"
        ax.text(
            bar.get_x() + bar.get_width() / 2,
            bar.get_height() + 0.01,
            f"{text}\nn={int(s)}",
            ha="center",
            va="bottom",
            fontsize=7,
        )
    if overall is not None:
        ax.axhline(overall, color="tab:red", linestyle="--", linewidth=1)
        title = f"{title} (red line: overall {overall:.3f})"
    ax.set_xticks(x, class_names, **_tick_kwargs(n))
    ax.set(ylim=(0, 1.15), ylabel="accuracy (recall)", title=title)
    ax.grid(axis="y", alpha=0.3)
    save_figure(fig, path)
