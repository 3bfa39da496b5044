"""Stage `label_issues`'s report, whatever the task: issues.csv, gallery.png, details.json and metrics.json.

issues.csv ranks the train images whose label is likely wrong, worst first: rank, index (the row of the
train split), path (as in the split's manifest: the file relative to data.root, or the source's name for
the image), given and suggested class, label_quality (the out-of-fold probability of the given class).
`prepare` reads it back for `balance.drop_label_issues`.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

from visionops import atomic, measured

FIELDS = ["rank", "index", "path", "given", "suggested", "label_quality"]
# what `dvc metrics show` shows of this stage: the count alone, so that its table stays about 200 columns wide
HEADLINE = ("label_issues",)
ISSUES_CSV, GALLERY = "issues.csv", "gallery.png"
CLASSIFICATION_ONLY = (
    "label-issue detection is classification-only for now: cleanlab's object_detection and segmentation modules "
    "need out-of-fold predictions, i.e. one detector or segmenter trained per fold (K times the train stage), "
    "which does not fit the pipeline's budget; no image is listed")


def write_issues_csv(path: Path, rows: list[list]) -> None:
    text = io.StringIO()
    writer = csv.writer(text)
    writer.writerow(FIELDS)
    writer.writerows(rows)
    atomic.write_text(path, text.getvalue())


def note_figure(path: Path, title: str, message: str) -> None:
    """A PNG that says why it shows no image."""
    from visionops.evaluation.plots import _pyplot, save_figure

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 1.2))
    ax.text(0.5, 0.5, message, ha="center", va="center", wrap=True, fontsize=8)
    ax.set_axis_off()
    fig.suptitle(title)
    save_figure(fig, path)


def write_reports(reports_dir: Path, result: dict) -> dict:
    """details.json, metrics.json (HEADLINE) and measured.json of `result`; returns it."""
    measured.write_reports(reports_dir, result, HEADLINE)
    return result


def not_listed(reports_dir: Path, train_images: int, note: str) -> dict:
    """The report of a run that lists no image (a task without label-issue detection, or label_issues.enabled
    false): an empty issues.csv, a gallery that says why, and the note in details.json (the CLI prints it)."""
    write_issues_csv(reports_dir / ISSUES_CSV, [])
    note_figure(reports_dir / GALLERY, "Likely label errors", note)
    return write_reports(reports_dir, {"train_images": train_images, "label_issues": None,
                                       "label_issue_fraction": None, "note": note})


def classification_only(dataset_dir: Path, reports_dir: Path) -> dict:
    """The report of detection and segmentation: CLASSIFICATION_ONLY, with the train split's size."""
    from visionops.data import dataset

    return not_listed(reports_dir, len(dataset.load(dataset_dir).splits["train"]), CLASSIFICATION_ONLY)
