"""A drift window's report: one self-contained HTML file (charts embedded as PNG data URIs).

The verdict, the tests against their Bonferroni threshold, the data-quality numbers, the label-free estimate
beside the reference's score, histograms of reference against window (confidence, brightness, contrast, blur),
the answer-class shares, and the embeddings of both projected on the reference's first two principal axes.
`write_history` draws the windows of one model version: each test's p-value and the estimate, per window.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import pandas as pd

from visionops import atomic
from visionops.evaluation import report_html
from visionops.evaluation.plots import _pyplot, save_figure
from visionops.monitoring.drift import SUMMARIES, WindowVerdict, answered, embeddings

PCA_POINTS = 2000  # points of each sample drawn at most in the scatter


def _histograms(reference: pd.DataFrame, window: pd.DataFrame, path: Path) -> None:
    plt = _pyplot()
    fig, axes = plt.subplots(1, 1 + len(SUMMARIES), figsize=(4 * (1 + len(SUMMARIES)), 3))
    for ax, column in zip(axes, ("confidence", *SUMMARIES), strict=True):
        r, w = reference[column].dropna().to_numpy(float), window[column].dropna().to_numpy(float)
        edges = np.histogram_bin_edges(np.concatenate([r, w]) if len(w) else r, bins=30)
        ax.hist(r, bins=edges, density=True, alpha=0.5, label=f"reference ({len(r)})")
        ax.hist(w, bins=edges, density=True, alpha=0.5, label=f"window ({len(w)})")
        ax.set(title=column, yticks=[])
    axes[0].legend(fontsize=8)
    save_figure(fig, path)


def _class_shares(verdict: WindowVerdict, path: Path) -> None:
    plt = _pyplot()
    classes = list(verdict.class_shares)
    x = np.arange(len(classes))
    fig, ax = plt.subplots(figsize=(max(5.0, 0.5 * len(classes)), 3))
    ax.bar(x - 0.2, [verdict.class_shares[c][0] for c in classes], 0.4, label="reference")
    ax.bar(x + 0.2, [verdict.class_shares[c][1] for c in classes], 0.4, label="window")
    ax.set_xticks(x, classes, rotation=45, ha="right")
    ax.set(ylabel="share of answers", title="answer_class")
    ax.legend(fontsize=8)
    save_figure(fig, path)


def _pca_scatter(reference: pd.DataFrame, window: pd.DataFrame, path: Path) -> None:
    plt = _pyplot()
    rng = np.random.default_rng(0)
    ref = embeddings(reference)
    win = embeddings(window) if len(window) else np.empty((0, ref.shape[1]))
    mean = ref.mean(axis=0)
    axes = np.linalg.svd(ref - mean, full_matrices=False)[2][:2].T
    fig, ax = plt.subplots(figsize=(5, 4))
    for points, label in ((ref, "reference"), (win, "window")):
        shown = points[rng.choice(len(points), min(len(points), PCA_POINTS), replace=False)]
        xy = (shown - mean) @ axes
        ax.scatter(xy[:, 0], xy[:, 1], s=4, alpha=0.4, label=label)
    ax.set(xlabel="PC 1 (reference)", ylabel="PC 2", title="embeddings")
    ax.legend(fontsize=8, markerscale=3)
    save_figure(fig, path)


def _num(v: float) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)


def markdown(verdict: WindowVerdict, title: str) -> str:
    """The report's text (Markdown), images named as written by `write_report`."""
    est = verdict.estimate
    banner = "DRIFTED" if verdict.drifted else "no drift"
    rows = [f"| {name} | {_num(t['statistic'])} | {_num(t['p_value'])} | {_num(verdict.threshold)} | "
            f"{'yes' if t['drifted'] else 'no'} |" for name, t in verdict.tests.items()]
    q = verdict.quality
    quality = [f"| error rate | {_num(q['error_rate'])} | ≤ {_num(q['max_error_rate'])} (monitor.max_error_rate) | "
               f"{'yes' if q['error_rate_drifted'] else 'no'} |"]
    quality += [f"| {s} outside the reference's 0.5-99.5 % | {_num(q[f'{s}_out_of_range'])} | 0.01 expected | – |"
                for s in SUMMARIES if f"{s}_out_of_range" in q]
    return "\n".join([
        f"# {title}: {banner}",
        "",
        f"{verdict.n_window} window rows against {verdict.n_reference} reference rows. The window drifts when a "
        f"test's p-value is below {_num(verdict.threshold)} (monitor.alpha / {max(len(verdict.tests), 1)} tests, "
        "Bonferroni) or its error rate is over its limit.",
        "",
        "## Tests",
        "",
        "| test | statistic | p-value | threshold | drifted |",
        "|---|---|---|---|---|",
        *rows,
        "",
        f"PSI of the answer_class shares: {_num(verdict.psi)} (reported, not tested).",
        "",
        "## Data quality",
        "",
        "| measure | value | limit | drifted |",
        "|---|---|---|---|",
        *quality,
        "",
        "## Label-free estimate",
        "",
        "| metric | method | window (estimated) | reference (measured) |",
        "|---|---|---|---|",
        f"| {est['metric']} | {est['method']} | {_num(est['estimate'])} | {_num(est['reference'])} |",
        "",
        "## Distributions",
        "",
        "![reference against window](histograms.png)",
        "",
        "![answer_class shares](classes.png)",
        "",
        "![embeddings on the reference's principal axes](embeddings.png)",
        "",
    ])


def write_report(verdict: WindowVerdict, reference: pd.DataFrame, window: pd.DataFrame, path: Path | str,
                 title: str = "Drift window") -> Path:
    """Write the window's self-contained HTML report to `path` (atomically); returns it."""
    ref, win = answered(reference), answered(window)
    with tempfile.TemporaryDirectory(prefix="visionops-drift-") as tmp:
        folder = Path(tmp)
        _histograms(ref, win, folder / "histograms.png")
        _class_shares(verdict, folder / "classes.png")
        _pca_scatter(ref, win, folder / "embeddings.png")
        atomic.write_text(path, report_html.render(markdown(verdict, title), folder, title))
    return Path(path)


def write_history(history: pd.DataFrame, path: Path | str) -> Path:
    """The drift history chart (PNG): each test's p-value per window with the threshold, and the label-free
    estimate per window with the reference's score. `history`: one row per window (index: its step), the
    columns of `WindowVerdict.metrics`."""
    plt = _pyplot()
    fig, (ax_p, ax_e) = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
    steps = history.index.to_numpy()
    for column in (c for c in history.columns if c.endswith(".p_value")):
        ax_p.plot(steps, history[column].clip(lower=1e-6), marker="o", ms=3, label=column.removesuffix(".p_value"))
    ax_p.plot(steps, history["threshold"], "k--", label="threshold")
    drifted = history["drifted"] > 0
    ax_p.scatter(steps[drifted], [1.5] * int(drifted.sum()), marker="v", color="red", label="drifted")
    ax_p.set(yscale="log", ylabel="p-value", title="drift tests per window")
    ax_p.legend(fontsize=7, ncol=3, loc="lower left")
    ax_e.plot(steps, history["estimate"], marker="o", ms=3, label="label-free estimate")
    ax_e.plot(steps, history["reference_score"], "k--", label="reference (measured)")
    ax_e.set(xlabel="window", ylabel="headline metric", ylim=(0, 1.02))
    ax_e.legend(fontsize=8)
    save_figure(fig, path)
    return Path(path)
