"""Duplicate groups in `validate`: each stored image's group, the groups that span splits, and label conflicts.

An image's group is the one `download` stored (`Split.groups`: near duplicates, `visionops.data.neardup`), or
where it stored none, its canonical pixels' content hash (exact copies). Members of a group whose labels differ
(the task says how, `same`) conflict: each is compared with the group's first member (in split, then index
order), and both are flagged, each naming the other.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pandas as pd
from scipy.optimize import linear_sum_assignment

from visionops.data.dataset import Dataset

EXAMPLES = 5  # the largest groups listed in summary.json

Member = tuple[str, int]  # (split, index)


def same_labels(ds: Dataset, tolerance: float) -> Callable[[Member, Member], bool]:
    """Whether two stored images' labels agree: the class (classification); the boxes, matched one to one with
    equal classes, within `tolerance` of the canonical side in every coordinate (detection; a resized copy's
    boxes scale with it); at most a `tolerance` fraction of differing mask pixels (segmentation)."""
    splits = ds.splits
    if "boxes" in next(iter(splits.values())).targets:
        side = ds.image_shape[0]

        def boxes(m: Member) -> tuple[np.ndarray, np.ndarray]:
            t = splits[m[0]].targets
            keep = t["box_labels"][m[1]] >= 0
            return np.asarray(t["boxes"][m[1]][keep], np.float64), t["box_labels"][m[1]][keep]

        def same(a: Member, b: Member) -> bool:
            (box_a, cls_a), (box_b, cls_b) = boxes(a), boxes(b)
            if len(box_a) != len(box_b) or sorted(cls_a) != sorted(cls_b):
                return False
            # boxes of other classes never pair (a cost beyond any tolerance: tolerance < 1)
            far = np.abs(box_a[:, None] - box_b[None]).max(-1, initial=0.0)
            cost = np.where(cls_a[:, None] == cls_b[None], far, 2.0 * side)
            i, j = linear_sum_assignment(cost)
            return bool((cost[i, j] <= tolerance * side).all())

        return same
    if "masks" in next(iter(splits.values())).targets:
        def mask(m: Member) -> np.ndarray:
            return splits[m[0]].targets["masks"][m[1]]

        return lambda a, b: np.mean(mask(a) != mask(b)) <= tolerance
    return lambda a, b: splits[a[0]].labels[a[1]] == splits[b[0]].labels[b[1]]


def add_group_columns(manifest: pd.DataFrame, ds: Dataset, same: Callable[[Member, Member], bool]) -> None:
    """Add group, group_size, group_spans_splits, label_conflict and conflicts_with to the per-image manifest
    (rows with columns split, index, path, readable, content_hash; a rejected file is in no group)."""
    stored = manifest["readable"].to_numpy(bool)
    group = manifest["content_hash"].where(stored, "").astype(object)
    for name, split in ds.splits.items():
        rows = stored & (manifest["split"] == name).to_numpy()
        if split.groups:
            group[rows] = [split.groups[int(i)] for i in manifest.loc[rows, "index"]]
    manifest["group"] = group
    by_group = manifest[stored].groupby("group")
    manifest["group_size"] = 0
    manifest.loc[stored, "group_size"] = by_group["split"].transform("size").to_numpy(np.int64)
    manifest["group_spans_splits"] = False
    manifest.loc[stored, "group_spans_splits"] = (by_group["split"].transform("nunique") > 1).to_numpy()
    manifest["label_conflict"] = False
    manifest["conflicts_with"] = ""
    for rows in by_group.indices.values():
        if len(rows) < 2:
            continue
        members = manifest.index[stored][rows]
        first = members[0]
        a = (manifest.at[first, "split"], int(manifest.at[first, "index"]))
        for r in members[1:]:
            if same(a, (manifest.at[r, "split"], int(manifest.at[r, "index"]))):
                continue
            manifest.loc[[first, r], "label_conflict"] = True
            manifest.at[r, "conflicts_with"] = manifest.at[first, "path"]
            if not manifest.at[first, "conflicts_with"]:
                manifest.at[first, "conflicts_with"] = manifest.at[r, "path"]
    for col in ("group_spans_splits", "label_conflict"):
        manifest[col] = manifest[col].astype(bool)


def summary(manifest: pd.DataFrame) -> dict:
    """Counts of the groups of two or more images, and the largest ones' files."""
    multi = manifest[manifest["group_size"] > 1]
    groups = multi.groupby("group", sort=False)
    largest = sorted(groups["path"].agg(list), key=lambda paths: (-len(paths), paths))[:EXAMPLES]
    return {
        "groups": groups.ngroups,
        "images_in_groups": len(multi),
        "largest": int(multi["group_size"].max()) if len(multi) else 1,
        "spanning_splits": int(groups["group_spans_splits"].any().sum()),
        "with_label_conflicts": int(groups["label_conflict"].any().sum()),
        "examples": largest,
    }


def checks(gx, on_label_conflict: str, meta: Callable[[str, str], dict] = lambda check, problem: {"check": check}):
    """The groups' expectations on the per-image frame: a group spanning splits warns (the source's own splits:
    download never places a group across its parts); a label conflict warns or fails as `on_label_conflict`."""
    E = gx.expectations
    conflict = E.ExpectColumnValuesToBeInSet(
        column="label_conflict", value_set=[False],
        meta=meta("duplicates (exact or near, data.near_duplicate_*) have the same labels", "conflict"))
    return {
        "warning_images": [
            E.ExpectColumnValuesToBeInSet(
                column="group_spans_splits", value_set=[False],
                meta=meta("no near-duplicate group spans two of the source's own splits", "spans")),
            *([conflict] if on_label_conflict == "warn" else []),
        ],
        "critical_images": [conflict] if on_label_conflict == "error" else [],
    }  # fmt: skip
