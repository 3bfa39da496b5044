"""The `validate` stage for per-object datasets (detection, segmentation), run with Great Expectations.

Three frames are validated: the per-image manifest (one row per stored image and per rejected file:
decodable, not duplicated across splits, not blank, the mask's size and values, duplicates' labels agree
(`visionops.data.dup_groups`)), the per-object
manifest (from each split's objects.csv: class in the class set, and for detection the box inside the
image with positive area), the train instance counts per class (imbalance, empty classes: warnings) and, for
segmentation, the train pixels per class (pixel imbalance: a warning above validate.max_pixel_imbalance_ratio).
A task supplies its own expectations (`Checks`); each carries `meta.check` (the rule, for the reports)
and `meta.problem` (how one offending row is phrased, see `PROBLEMS`), so a failure names the file and
the object: `train/images/a.png object 2: box [10, 5, 90, 40] outside the 64x48 image`.

Outputs in `out_dir`, written whether or not the checks pass: summary.json, manifest.csv (per image),
class_counts.csv (instances per class per split), metrics.json (the headline) and data_docs/.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd

from visionops.atomic import atomic_dir, atomic_path, write_json
from visionops.config import ValidateConfig
from visionops.data import dataset as dsmod
from visionops.data import dup_groups
from visionops.data.expectations import SUMMARY_PATHS, describe, failures, image_stats, import_gx, run_gx
from visionops.errors import MissingInputError, ValidationFailed

HEADLINE = ("success", "images", "objects", "empty_images", "imbalance_ratio")
PIXEL_HEADLINE = ("pixel_imbalance_ratio",)  # segmentation's, beside the instance one


def _box(r) -> str:
    return "[" + ", ".join(f"{v:g}" for v in (r.x0, r.y0, r.x1, r.y1)) + "]"


# How one offending row is phrased, by the `problem` its expectation names.
PROBLEMS: dict[str, Callable] = {
    "class": lambda r: f"class id {r.category} ({r.category_name or 'no name'}) is not in the class set",
    "box_missing": lambda r: "has no box",
    "box_outside": lambda r: f"box {_box(r)} outside the {r.width:g}x{r.height:g} image",
    "box_area": lambda r: f"box {_box(r)} has no area",
    "readable": lambda r: r.error,
    "mask_size": lambda r: f"mask {r.mask_width:g}x{r.mask_height:g} does not match the {r.orig_width:g}x{r.orig_height:g} image",
    "mask_values": lambda r: f"mask values {r.mask_unknown_values.replace(';', ', ')} are not in the class set (or 255)",
    "empty": lambda r: "has no objects",
    "pixels": lambda r: f"pixel mean {r.pixel_mean:.1f}, std {r.pixel_std:.1f} (blank or saturated)",
    "conflict": lambda r: f"labels differ from its duplicate {r.conflicts_with}",
    "spans": lambda r: f"in a group of {r.group_size} near duplicates across splits",
}


def _where(split: str, path: str) -> str:
    return path if path.startswith(f"{split}/") else f"{split}/{path}"


def _read_table(path: Path, name: str) -> pd.DataFrame:
    if not path.is_file():
        raise MissingInputError(f"{path}: no {name} (the dataset predates per-object data; rerun download)")
    return pd.read_csv(path, keep_default_na=False, na_values={"x0": [""], "y0": [""], "x1": [""], "y1": [""]})


def build_frames(dataset_dir: Path, ds: dsmod.Dataset) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(per-image manifest, per-object manifest) of the stored images and rejected files."""
    images, objects = [], []
    for split, s in ds.splits.items():
        d = dataset_dir / split
        targets = _read_table(d / "targets.csv", "targets.csv")
        objs = _read_table(d / "objects.csv", "objects.csv")
        n = len(s)
        orig = np.asarray(s.orig_shapes, np.float64).reshape(-1, 3) if n else np.zeros((0, 3))
        means, stds, hashes = image_stats(s.images)
        where = [_where(split, p) for p in s.paths]
        images.append(pd.DataFrame({
            "split": split, "index": np.arange(n), "path": where, "readable": True, "error": "",
            "orig_height": orig[:, 0], "orig_width": orig[:, 1], "orig_channels": orig[:, 2],
            "objects": targets["objects"].to_numpy(np.int64),
            "mask_height": pd.to_numeric(targets["mask_height"], errors="coerce").to_numpy(np.float64),
            "mask_width": pd.to_numeric(targets["mask_width"], errors="coerce").to_numpy(np.float64),
            "mask_unknown_values": targets["mask_unknown_values"].astype(str).to_numpy(),
            "pixel_mean": means, "pixel_std": stds, "content_hash": hashes,
        }))  # fmt: skip
        objs["split"] = split
        objs["path"] = [f"{_where(split, p)} object {k}" for p, k in zip(objs["path"], objs["object"])]
        objs["height"] = orig[objs["index"].to_numpy(np.int64), 0] if len(objs) else []
        objs["width"] = orig[objs["index"].to_numpy(np.int64), 1] if len(objs) else []
        objects.append(objs)
    if ds.rejected:
        images.append(pd.DataFrame({
            "split": [r.split for r in ds.rejected], "path": [_where(r.split, r.path) for r in ds.rejected],
            "readable": False, "error": [r.error for r in ds.rejected], "objects": 0, "mask_unknown_values": "",
        }))  # fmt: skip
    manifest = pd.concat(images, ignore_index=True)
    manifest["readable"] = manifest["readable"].astype(bool)
    manifest["mask_unknown_values"] = manifest["mask_unknown_values"].replace("nan", "").fillna("")
    stored = manifest["readable"]
    n_splits = manifest.loc[stored].groupby("content_hash")["split"].transform("nunique")
    manifest["leaks_across_splits"] = False
    manifest.loc[stored, "leaks_across_splits"] = (n_splits > 1).to_numpy()
    manifest["leaks_across_splits"] = manifest["leaks_across_splits"].astype(bool)
    object_frame = pd.concat(objects, ignore_index=True)
    object_frame["category"] = object_frame["category"].astype(str)
    return manifest, object_frame


def instance_counts(objects: pd.DataFrame, class_names: list[str], splits: list[str], first: int) -> pd.DataFrame:
    """Rows split, class_name, instances for every split and class from index `first` (zeros too)."""
    counts = objects[objects["class_index"] >= 0].groupby(["split", "class_index"]).size()
    rows = [(s, class_names[c], int(counts.get((s, c), 0))) for s in splits for c in range(first, len(class_names))]
    return pd.DataFrame(rows, columns=["split", "class_name", "instances"])


def pixel_frame(masks: np.ndarray, class_names: list[str]) -> pd.DataFrame:
    """Train pixels per class (IGNORE left out) and each present class's ratio to the smallest present one."""
    pixels = np.bincount(np.asarray(masks).ravel(), minlength=256)[: len(class_names)]
    present = pixels > 0
    smallest = pixels[present].min() if present.any() else 1
    return pd.DataFrame({"path": class_names, "pixels": pixels.astype(np.int64),
                         "ratio_to_smallest": np.where(present, pixels / smallest, np.nan)})


def meta(check: str, problem: str) -> dict:
    """An expectation's meta: the rule as the reports word it, and the problem a failure names per file and object."""
    return {"check": check, "problem": problem}


def image_checks(gx, cfg: ValidateConfig) -> dict[str, list]:
    """The image expectations every dense task shares."""
    E = gx.expectations
    lo, hi = cfg.pixel_mean_range

    return {
        "critical_images": [
            E.ExpectColumnValuesToBeInSet(column="readable", value_set=[True],
                                          meta=meta("source file is readable (decoded)", "readable")),
            E.ExpectColumnValuesToBeInSet(column="leaks_across_splits", value_set=[False],
                                          meta={"check": "no image appears in more than one split (train/val/test leak)"}),
            E.ExpectColumnValuesToBeBetween(column="pixel_mean", min_value=lo, max_value=hi,
                                            meta=meta(f"pixel mean in [{lo}, {hi}]", "pixels")),
            E.ExpectColumnValuesToBeBetween(column="pixel_std", min_value=cfg.min_pixel_std,
                                            meta=meta(f"pixel std >= {cfg.min_pixel_std} (not blank)", "pixels")),
        ],
        "warning_images": [
            E.ExpectColumnValuesToBeBetween(column="objects", min_value=1, meta=meta("image has objects", "empty")),
            *(E.ExpectColumnValuesToBeBetween(column=col, min_value=1, max_value=cfg.max_image_size,
                                              meta={"check": f"source image {col[5:]} <= {cfg.max_image_size}"})
              for col in ("orig_height", "orig_width")),
        ],
    }  # fmt: skip


def class_count_checks(gx, cfg: ValidateConfig) -> dict[str, list]:
    E = gx.expectations
    return {
        "warning_class_counts": [
            E.ExpectColumnValuesToBeBetween(column="instances", min_value=1,
                                            meta={"check": "every class has train instances"}),
            E.ExpectColumnValuesToBeBetween(
                column="ratio_to_smallest", max_value=cfg.max_imbalance_ratio,
                meta={"check": f"train instance imbalance (count / smallest class count) <= {cfg.max_imbalance_ratio}"}),
        ]
    }  # fmt: skip


def pixel_checks(gx, cfg: ValidateConfig) -> dict[str, list]:
    limit = cfg.max_pixel_imbalance_ratio
    return {
        "warning_class_pixels": [
            gx.expectations.ExpectColumnValuesToBeBetween(
                column="ratio_to_smallest", max_value=limit,
                meta={"check": f"train pixel imbalance (pixels / smallest present class's pixels) <= {limit}"}),
        ]
    }  # fmt: skip


def _phrase(entries: list[dict], frames: dict[str, pd.DataFrame], suites: dict[str, list]) -> None:
    """Replace each entry's offending paths by `<path>: <problem>` where its expectation names a problem."""
    problems = {(name, (e.meta or {}).get("check")): (e.meta or {}).get("problem")
                for name, exps in suites.items() for e in exps}
    for entry in entries:
        problem = problems.get((entry["suite"], entry["check"]))
        if not problem:
            continue
        rows = frames[entry["suite"].split("_", 1)[1]].drop_duplicates("path").set_index("path")
        lines = [f"{p}: {PROBLEMS[problem](rows.loc[p])}" if p in rows.index else p for p in entry["_all_paths"]]
        entry["_all_paths"] = lines
        entry["offending"] = lines[:SUMMARY_PATHS]


def _merge(*parts: dict[str, list]) -> dict[str, list]:
    suites: dict[str, list] = {}
    for part in parts:
        for name, expectations in part.items():
            suites.setdefault(name, []).extend(expectations)
    return suites


def _pixel_summary(frame: pd.DataFrame) -> dict:
    ratio = frame["ratio_to_smallest"].max()
    return {"pixel_imbalance_ratio": round(float(ratio), 4) if math.isfinite(ratio) else None,
            "class_pixels": dict(zip(frame["path"], frame["pixels"].astype(int).tolist()))}


def run_dense_validate(dataset_dir: Path, cfg: ValidateConfig, out_dir: Path, object_checks: Callable,
                       first_class: int = 0, pixels: bool = False) -> dict:
    """Check a detection or segmentation dataset; `object_checks(gx, cfg, class_names)` gives the task's own
    suites (added to the shared ones); instance counts cover the classes from `first_class` (1 skips segmentation's
    background); `pixels`: the train masks' pixels per class are counted and checked too.

    Raises ValidationFailed (after writing every output) when a critical check fails.
    """
    t0 = time.perf_counter()
    dataset_dir, out_dir = Path(dataset_dir), Path(out_dir).resolve()  # GX wants an absolute docs path
    out_dir.mkdir(parents=True, exist_ok=True)
    ds = dsmod.load(dataset_dir)
    names = list(ds.class_names)
    manifest, objects = build_frames(dataset_dir, ds)
    dup_groups.add_group_columns(manifest, ds, dup_groups.same_labels(ds, cfg.label_conflict_tolerance))
    counts = instance_counts(objects, names, list(ds.splits), first_class)
    train = counts[counts["split"] == "train"]
    smallest = train["instances"].min() if len(train) else 0
    count_frame = pd.DataFrame({
        "path": train["class_name"].to_numpy(), "instances": train["instances"].to_numpy(np.int64),
        "ratio_to_smallest": (train["instances"] / smallest).to_numpy(np.float64) if smallest > 0 else np.nan,
    })  # fmt: skip

    gx, ProgressBarsConfig = import_gx()
    frames = {"images": manifest, "objects": objects, "class_counts": count_frame}
    suites = _merge(image_checks(gx, cfg), object_checks(gx, cfg, names), class_count_checks(gx, cfg),
                    dup_groups.checks(gx, cfg.on_label_conflict, meta))
    if pixels:
        frames["class_pixels"] = pixel_frame(ds.splits["train"].targets["masks"], names)
        suites = _merge(suites, pixel_checks(gx, cfg))
    with atomic_dir(out_dir / "data_docs") as docs_tmp:
        results = run_gx(gx, ProgressBarsConfig, suites, frames, docs_tmp)
    critical, warnings = failures(results, manifest)
    _phrase(critical + warnings, frames, suites)

    stored = manifest[manifest["readable"]]
    known = objects["class_index"] >= 0
    ratio = float(train["instances"].max() / smallest) if smallest > 0 else None
    summary = {
        "success": not critical,
        "dataset": str(dataset_dir),
        "source": ds.source,
        "task": ds.task,
        "images": len(stored),
        "objects": len(objects),
        "empty_images": int((stored["objects"] == 0).sum()),
        "imbalance_ratio": None if ratio is None or not math.isfinite(ratio) else round(ratio, 4),
        "n_images": {s: len(split) for s, split in ds.splits.items()},
        "n_objects": {s: int((objects["split"] == s).sum()) for s in ds.splits},
        "n_rejected": len(ds.rejected),
        "n_classes": len(names),
        "n_unknown_class_objects": int((~known).sum()),
        "n_leaking_images": int(manifest["leaks_across_splits"].sum()),
        "near_duplicates": dup_groups.summary(manifest),
        "class_counts": {s: dict(zip(g["class_name"], g["instances"].astype(int).tolist()))
                         for s, g in counts.groupby("split", sort=False)},
        **(_pixel_summary(frames["class_pixels"]) if pixels else {}),
        "critical_failures": [{k: v for k, v in e.items() if not k.startswith("_")} for e in critical],
        "warnings": [{k: v for k, v in e.items() if not k.startswith("_")} for e in warnings],
    }  # fmt: skip

    out_manifest = manifest.copy()
    for col in ("index", "orig_height", "orig_width", "orig_channels", "mask_height", "mask_width"):
        out_manifest[col] = out_manifest[col].astype("Int64")
    with atomic_path(out_dir / "manifest.csv") as tmp:
        out_manifest.to_csv(tmp, index=False)
    with atomic_path(out_dir / "class_counts.csv") as tmp:
        counts.to_csv(tmp, index=False)
    write_json(out_dir / "summary.json", summary)  # DVC hashes it: no timings, no absolute paths
    write_json(out_dir / "metrics.json", {k: summary[k] for k in (*HEADLINE, *PIXEL_HEADLINE) if k in summary})

    if critical:
        message = (
            f"validate: {len(critical)} critical check(s) failed for {dataset_dir} "
            f"(details in {out_dir / 'summary.json'}, {out_dir / 'data_docs' / 'index.html'}):\n" + describe(critical)
        )
        raise ValidationFailed(message, summary)
    return {**summary, "seconds": round(time.perf_counter() - t0, 3)}
