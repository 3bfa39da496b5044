"""Seeded, stratified splitting that keeps exact duplicates together (no train/test leakage)."""

from __future__ import annotations

import numpy as np


def stratified_split(
    labels: np.ndarray, groups: list[str], fractions: dict[str, float], seed: int
) -> dict[str, np.ndarray]:
    """Split indices into "train" plus one part per entry of `fractions`, stratified by label.

    Items sharing a group key (a content hash) always land in the same part, so an image stored
    twice can never be in both train and test. Each class keeps at least one training group.
    """
    rng = np.random.default_rng(seed)
    _, first, inverse = np.unique(np.asarray(groups), return_index=True, return_inverse=True)
    group_labels = np.asarray(labels)[first]
    parts: dict[str, list[np.ndarray]] = {"train": [], **{name: [] for name in fractions}}
    for cls in np.unique(group_labels):
        members = rng.permutation(np.flatnonzero(group_labels == cls))
        start = 0
        for name, frac in fractions.items():
            n = min(int(round(frac * len(members))), max(len(members) - start - 1, 0))
            parts[name].append(members[start : start + n])
            start += n
        parts["train"].append(members[start:])
    order = np.argsort(inverse, kind="stable")
    bounds = np.searchsorted(inverse[order], np.arange(len(first) + 1))
    out = {}
    for name, chunks in parts.items():
        chosen = np.sort(np.concatenate(chunks)) if chunks else np.empty(0, np.int64)
        idx = [order[bounds[g] : bounds[g + 1]] for g in chosen]
        out[name] = np.sort(np.concatenate(idx)) if idx else np.empty(0, np.int64)
    return out
