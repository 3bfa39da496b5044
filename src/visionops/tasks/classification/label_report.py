"""Stage `label_issues` for classification: out-of-fold probabilities of the train split, confident
learning, and the report (`visionops.tasks.label_issues_report`) with a gallery of the worst issues."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from visionops.config import Params
from visionops.data import dataset
from visionops.tasks import label_issues_report as report
from visionops.tasks.classification.label_issues import LabelIssues, fold_train_config, out_of_fold_probs, rank_label_issues

GALLERY_COLUMNS = 6


def issue_gallery(images_nhwc, given: list[str], suggested: list[str], quality, path: Path) -> None:
    """One PNG of the worst issues, each captioned with its given and suggested class and its label quality."""
    from visionops.evaluation.plots import _pyplot, save_figure
    from visionops.tasks.classification.explain import show_image

    title = "Likely label errors (train split), worst first"
    if not given:
        report.note_figure(path, title, "no likely label error found")
        return
    plt = _pyplot()
    cols = min(GALLERY_COLUMNS, len(given))
    rows = -(-len(given) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(1.7 * cols, 2.1 * rows + 0.4), squeeze=False, layout="constrained")
    for ax in axes.flat:
        ax.set_axis_off()
    for i, ax in enumerate(axes.flat[: len(given)]):
        show_image(ax, np.asarray(images_nhwc[i]))
        ax.set_title(f"given: {given[i]}\nsuggested: {suggested[i]}\nquality {float(quality[i]):.3f}", fontsize=7)
    fig.suptitle(title)
    save_figure(fig, path)


def write_issues(split: dataset.Split, names: list[str], found: LabelIssues, reports_dir: Path, gallery_size: int) -> None:
    """issues.csv (every issue, worst first) and gallery.png (the first `gallery_size`)."""
    rows = [[rank, int(i), split.paths[i], names[split.labels[i]], names[found.suggested[i]], f"{found.quality[i]:.6f}"]
            for rank, i in enumerate(found.ranked, start=1)]
    report.write_issues_csv(reports_dir / report.ISSUES_CSV, rows)
    top = found.ranked[:gallery_size]
    issue_gallery(split.images[top], [r[3] for r in rows[:gallery_size]],
                  [r[4] for r in rows[:gallery_size]], found.quality[top], reports_dir / report.GALLERY)


def run_label_issues(params: Params, dataset_dir: Path, reports_dir: Path) -> dict:
    cfg = params.label_issues
    ds = dataset.load(dataset_dir)
    split = ds.splits["train"]
    if not cfg.enabled:
        return report.not_listed(reports_dir, len(split), "label_issues.enabled is false: no model trained, no image listed")
    start = time.perf_counter()
    val = ds.splits.get("val")
    val = (np.asarray(val.images), val.labels) if val is not None else (split.images[:0], split.labels[:0])
    probs = out_of_fold_probs(np.asarray(split.images), split.labels, ds.class_names,
                              fold_train_config(cfg, params.train), params.augment, cfg.folds, val)
    found = rank_label_issues(split.labels, probs, cfg.filter_by)
    write_issues(split, ds.class_names, found, reports_dir, cfg.gallery_size)
    per_class = np.bincount(split.labels[found.ranked], minlength=len(ds.class_names))
    return report.write_reports(reports_dir, {
        "train_images": len(split),
        "label_issues": len(found.ranked),
        "label_issue_fraction": len(found.ranked) / max(len(split), 1),
        "out_of_fold_accuracy": float((found.suggested == split.labels).mean()) if len(split) else 0.0,
        "issues_by_given_class": dict(zip(ds.class_names, per_class.tolist())),
        "model": cfg.model,
        "folds": cfg.folds,
        "filter_by": cfg.filter_by,
        "seconds": time.perf_counter() - start,
    })
