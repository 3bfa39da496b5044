"""The `validate` stage: data checks on the canonical dataset, run with Great Expectations.

`run_validate` builds a per-image manifest (shape, pixel statistics, content hash, readability)
from the memory-mapped arrays, derives the cross-row facts a row-wise expectation cannot see
(duplicates across splits, per-class counts), and validates them with two kinds of suites:

* critical (`critical_*`): labels in range, one image shape, every file decodable, no image shared
  between splits, no blank/constant images, no class without train images. A failure raises
  `ValidationFailed`, whose message names each failed check and the offending files.
* warning (`warning_*`): class imbalance above `max_imbalance_ratio`, source images larger than
  `max_image_size`, near-duplicate groups spanning the source's own splits. Recorded in `summary.json`, never
  fatal.

Duplicates whose classes differ warn, or fail with validate.on_label_conflict "error"
(`visionops.data.dup_groups`); summary.json's `near_duplicates` counts the groups and lists the largest.

Everything is written to `out_dir` whether or not the checks pass: `metrics.json` (the DVC metrics:
success and imbalance ratio), `summary.json` (the details: counts, failed checks, warnings),
`manifest.csv`, `class_counts.csv` and the GX Data Docs site under `data_docs/`.
"""

from __future__ import annotations

import json
import math
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from visionops.atomic import atomic_dir, atomic_path, write_json
from visionops.config import ValidateConfig
from visionops.data import dataset as dsmod
from visionops.data import dup_groups
from visionops.data.expectations import describe, failures, image_stats, import_gx, run_gx
from visionops.errors import ValidationFailed


def headline(summary: dict) -> dict:
    """The DVC metrics of a validation: its outcome and imbalance (the details stay in summary.json)."""
    return {"success": summary["success"], "imbalance_ratio": summary["imbalance_ratio"]}


MANIFEST_COLUMNS = [
    "split", "index", "label", "class_name", "path", "readable", "error",
    "height", "width", "channels", "orig_height", "orig_width", "orig_channels",
    "pixel_mean", "pixel_std", "content_hash", "leaks_across_splits",
]  # fmt: skip
INT_COLUMNS = ["index", "height", "width", "channels", "orig_height", "orig_width", "orig_channels"]


# --------------------------------------------------------------------------------------------
# Manifest


def _class_name_column(labels: np.ndarray, class_names: list[str]) -> list[Any]:
    k = len(class_names)
    return [class_names[int(y)] if 0 <= y < k else None for y in labels]


def build_manifest(ds: dsmod.Dataset) -> pd.DataFrame:
    """One row per stored image plus one (readable=False) per rejected file; adds the leak flag."""
    frames = []
    for name, split in ds.splits.items():
        images, labels, n = split.images, np.asarray(split.labels), len(split.images)
        if len(labels) != n or len(split.paths) != n:
            raise ValueError(
                f"split {name!r}: {n} images but {len(labels)} labels and {len(split.paths)} manifest rows"
            )
        shape = tuple(images.shape[1:]) + (None,) * 3
        h, w, c = shape[0], shape[1], shape[2] if images.ndim == 4 else -1
        orig = np.asarray(split.orig_shapes, dtype=np.int64).reshape(-1, 3) if split.orig_shapes else None
        if orig is None or len(orig) != n:
            orig = np.full((n, 3), np.nan)
        means, stds, hashes = image_stats(images)
        frames.append(
            pd.DataFrame(
                {
                    "split": name,
                    "index": np.arange(n, dtype=np.float64),
                    "label": labels.astype(np.int64),
                    "class_name": _class_name_column(labels, ds.class_names),
                    "path": list(split.paths),
                    "readable": True,
                    "error": "",
                    "height": float(h),
                    "width": float(w),
                    "channels": float(c),
                    "orig_height": orig[:, 0].astype(np.float64),
                    "orig_width": orig[:, 1].astype(np.float64),
                    "orig_channels": orig[:, 2].astype(np.float64),
                    "pixel_mean": means,
                    "pixel_std": stds,
                    "content_hash": hashes,
                }
            )
        )
    if ds.rejected:
        rej_labels = np.asarray([r.label for r in ds.rejected], dtype=np.int64)
        frames.append(
            pd.DataFrame(
                {
                    "split": [r.split for r in ds.rejected],
                    "label": rej_labels,
                    "class_name": _class_name_column(rej_labels, ds.class_names),
                    "path": [r.path for r in ds.rejected],
                    "readable": False,
                    "error": [r.error for r in ds.rejected],
                }
            )
        )
    df = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
    df = df.reindex(columns=MANIFEST_COLUMNS)
    for col in ["index", "height", "width", "channels", "orig_height", "orig_width", "orig_channels",
                "pixel_mean", "pixel_std"]:  # fmt: skip
        df[col] = df[col].astype(np.float64)
    df["label"] = df["label"].astype(np.int64)
    df["readable"] = df["readable"].astype(bool)
    df["error"] = df["error"].fillna("")
    # An image whose pixels appear in more than one split leaks; every copy is flagged, so the
    # message names the file on each side (train/val, train/test and val/test pairs).
    stored = df["readable"]
    n_splits = df.loc[stored].groupby("content_hash")["split"].transform("nunique")
    df["leaks_across_splits"] = False
    df.loc[stored, "leaks_across_splits"] = (n_splits > 1).to_numpy()
    df["leaks_across_splits"] = df["leaks_across_splits"].astype(bool)
    return df


def _class_folders(df: pd.DataFrame, class_names: list[str]) -> dict[str, str]:
    """For a folder source, the train folder of each class (`<train root>/<class>`)."""
    roots: Counter[Path] = Counter()
    train = df[df["split"] == "train"]
    for path, cls in zip(train["path"], train["class_name"]):
        if not isinstance(cls, str):
            continue
        for parent in Path(path).parents:
            if parent.name == cls:
                roots[parent.parent] += 1
                break
    if not roots:
        return {}
    root = roots.most_common(1)[0][0]
    return {c: str(root / c) for c in class_names}


def class_counts(df: pd.DataFrame, class_names: list[str], splits: list[str]) -> pd.DataFrame:
    """Rows split, class_name, count for the stored images of every split and class (zeros too)."""
    stored = df[df["readable"] & df["class_name"].notna()]
    counts = stored.groupby(["split", "class_name"]).size()
    rows = [(s, c, int(counts.get((s, c), 0))) for s in splits for c in class_names]
    return pd.DataFrame(rows, columns=["split", "class_name", "count"])


def _imbalance_ratio(train_counts: pd.Series) -> float | None:
    if train_counts.empty or train_counts.min() <= 0:
        return None
    return float(train_counts.max() / train_counts.min())


# --------------------------------------------------------------------------------------------
# Great Expectations


def _expected_shape(dataset_dir: Path, ds: dsmod.Dataset) -> tuple[int, int, int]:
    meta = json.loads((dataset_dir / "meta.json").read_text())
    shape = meta.get("image_shape") or list(ds.image_shape)
    return tuple(int(x) for x in shape)  # type: ignore[return-value]


def _suites(gx, cfg: ValidateConfig, n_classes: int, shape: tuple[int, int, int]) -> dict[str, list]:
    """Expectations per suite; each carries a readable `meta.check` used in reports."""
    E = gx.expectations
    lo, hi = cfg.pixel_mean_range
    h, w, c = shape

    def check(text: str) -> dict:
        return {"check": text}

    return {
        "critical_images": [
            E.ExpectColumnValuesToBeInSet(
                column="label", value_set=list(range(n_classes)), meta=check(f"label in 0..{n_classes - 1}")
            ),
            E.ExpectColumnValuesToBeInSet(column="height", value_set=[h], meta=check(f"image height == {h}")),
            E.ExpectColumnValuesToBeInSet(column="width", value_set=[w], meta=check(f"image width == {w}")),
            E.ExpectColumnValuesToBeInSet(column="channels", value_set=[c], meta=check(f"image channels == {c}")),
            E.ExpectColumnValuesToBeInSet(
                column="readable", value_set=[True], meta=check("source file is readable (decoded)")
            ),
            E.ExpectColumnValuesToBeInSet(
                column="leaks_across_splits",
                value_set=[False],
                meta=check("no image appears in more than one split (train/val/test leak)"),
            ),
            E.ExpectColumnValuesToBeBetween(
                column="pixel_mean", min_value=lo, max_value=hi, meta=check(f"pixel mean in [{lo}, {hi}]")
            ),
            E.ExpectColumnValuesToBeBetween(
                column="pixel_std",
                min_value=cfg.min_pixel_std,
                meta=check(f"pixel std >= {cfg.min_pixel_std} (not blank/constant)"),
            ),
        ],
        "warning_images": [
            E.ExpectColumnValuesToBeBetween(
                column=col,
                min_value=1,
                max_value=cfg.max_image_size,
                meta=check(f"source image {col.removeprefix('orig_')} <= {cfg.max_image_size}"),
            )
            for col in ("orig_height", "orig_width")
        ],
        "critical_class_counts": [
            E.ExpectColumnValuesToBeBetween(
                column="count",
                min_value=1,
                meta=check("every class has train images (no empty class: add images to a class whose few images "
                           "all hashed to val, test or holdout)"),
            ),
        ],
        "warning_class_counts": [
            E.ExpectColumnValuesToBeBetween(
                column="ratio_to_smallest",
                max_value=cfg.max_imbalance_ratio,
                meta=check(f"train class imbalance (count / smallest class count) <= {cfg.max_imbalance_ratio}"),
            ),
        ],
    }


# --------------------------------------------------------------------------------------------
# Stage


def run_validate(dataset_dir: Path, cfg: ValidateConfig, out_dir: Path) -> dict:
    """Check the dataset in `dataset_dir`; write the reports into `out_dir`; return the summary.

    Raises ValidationFailed (after writing every output) when a critical check fails.
    """
    t0 = time.perf_counter()
    dataset_dir, out_dir = Path(dataset_dir), Path(out_dir).resolve()  # GX wants an absolute docs path
    out_dir.mkdir(parents=True, exist_ok=True)
    ds = dsmod.load(dataset_dir)
    names = list(ds.class_names)
    shape = _expected_shape(dataset_dir, ds)

    manifest = build_manifest(ds)
    dup_groups.add_group_columns(manifest, ds, dup_groups.same_labels(ds, cfg.label_conflict_tolerance))
    manifest_seconds = time.perf_counter() - t0

    split_names = list(ds.splits)
    counts = class_counts(manifest, names, split_names)
    train = counts[counts["split"] == "train"].set_index("class_name")["count"].reindex(names, fill_value=0)
    folders = _class_folders(manifest, names) if ds.source == "folder" else {}
    smallest = train.min() if len(train) else 0
    train_frame = pd.DataFrame(
        {
            "class_name": names,
            "count": train.to_numpy(dtype=np.int64),
            "ratio_to_smallest": (train / smallest).to_numpy(dtype=np.float64) if smallest > 0 else np.nan,
            # the "path" of a class: its train folder for a folder source, else the class name
            "path": [folders.get(c, c) for c in names],
        }
    )

    gx, ProgressBarsConfig = import_gx()
    suites = _suites(gx, cfg, len(names), shape)
    for name, expectations in dup_groups.checks(gx, cfg.on_label_conflict).items():
        suites[name] += expectations
    with atomic_dir(out_dir / "data_docs") as docs_tmp:
        results = run_gx(
            gx, ProgressBarsConfig, suites, {"images": manifest, "class_counts": train_frame}, docs_tmp
        )
    critical, warnings = failures(results, manifest)

    ratio = _imbalance_ratio(train)
    summary = {
        "success": not critical,
        "dataset": str(dataset_dir),
        "source": ds.source,
        "n_images": {s: len(split) for s, split in ds.splits.items()},
        "n_rejected": len(ds.rejected),
        "n_classes": len(names),
        "image_shape": list(shape),
        "imbalance_ratio": None if ratio is None or not math.isfinite(ratio) else round(ratio, 4),
        "class_counts": {
            s: {c: int(n) for c, n in zip(g["class_name"], g["count"])} for s, g in counts.groupby("split", sort=False)
        },
        "n_leaking_images": int(manifest["leaks_across_splits"].sum()),
        "near_duplicates": dup_groups.summary(manifest),
        "critical_failures": [{k: v for k, v in e.items() if not k.startswith("_")} for e in critical],
        "warnings": [{k: v for k, v in e.items() if not k.startswith("_")} for e in warnings],
    }

    out_manifest = manifest.copy()
    for col in INT_COLUMNS:
        out_manifest[col] = out_manifest[col].astype("Int64")
    with atomic_path(out_dir / "manifest.csv") as tmp:
        out_manifest.to_csv(tmp, index=False)
    with atomic_path(out_dir / "class_counts.csv") as tmp:
        counts.to_csv(tmp, index=False)
    write_json(out_dir / "summary.json", summary)  # DVC hashes it: no timings, no absolute paths
    write_json(out_dir / "metrics.json", headline(summary))

    if critical:
        message = (
            f"validate: {len(critical)} critical check(s) failed for {dataset_dir} "
            f"(details in {out_dir / 'summary.json'}, {out_dir / 'data_docs' / 'index.html'}):\n"
            + describe(critical)
        )
        raise ValidationFailed(message, summary)
    return {**summary, "manifest_seconds": round(manifest_seconds, 3), "seconds": round(time.perf_counter() - t0, 3)}
