"""Stage `download`: fetch or read the configured source and write the canonical dataset and holdout."""

from __future__ import annotations

import contextlib
import sys
from collections import Counter
from pathlib import Path

import numpy as np

from visionops.atomic import atomic_dir
from visionops.config import DataConfig, ParamsError
from visionops.data import changes, dataset
from visionops.data.dataset import Dataset, Split
from visionops.data.imports import imported_at
from visionops.data.neardup import group_identities
from visionops.data.sources import load_source
from visionops.data.splits import hash_split
from visionops.layout import IMPORTS

HOLDOUT = "holdout"
# Below this many images a holdout cannot judge a promotion: a score on n images is known to about
# +-2 * sqrt(s(1 - s) / n), which is +-0.1 or wider below n = 100 (at s = 0.5; +-0.06 at s = 0.9), as wide as
# the differences the promotion gates decide on. (The one-sided exact McNemar test at the default
# significance 0.05 can reject at all only with 5 or more discordant images, since 0.5**4 > 0.05 >= 0.5**5;
# two models that agree on most images differ on a small fraction of the holdout.)
MIN_HOLDOUT = 100


def _take(split: Split, idx: np.ndarray) -> Split:
    return Split(
        images=split.images[idx],
        labels=split.labels[idx],
        paths=[split.paths[i] for i in idx],
        orig_shapes=[split.orig_shapes[i] for i in idx] if split.orig_shapes else [],
        targets={key: array[idx] for key, array in split.targets.items()},
        identities=[split.identities[i] for i in idx],
        sha256=[split.sha256[i] for i in idx] if split.sha256 else [],
        groups=[split.groups[i] for i in idx] if split.groups else [],
        source_masks=[split.source_masks[i] for i in idx] if split.source_masks else [],
    )


def group_near_duplicates(splits: dict[str, Split], max_distance: int,
                          imported: dict[tuple[str, str], str] | None = None) -> None:
    """Set every split's `groups` over all of the source's images, where the source gave perceptual hashes
    (`visionops.data.neardup`), each group named by its earliest members (`imported`: {(path, sha256): time},
    `data.imports`); a source that gave none keeps `groups` empty (it splits by identity)."""
    hashes = [h for split in splits.values() for h in split.near_hashes]
    if not any(hashes):
        return
    identities = [i for split in splits.values() for i in split.identities]
    ranks = [(imported or {}).get(key, "") for split in splits.values() for key in zip(split.paths, split.sha256)]
    groups = group_identities(identities, hashes, max_distance, ranks)
    start = 0
    for split in splits.values():
        split.groups, start = groups[start : start + len(split)], start + len(split)


def carve_splits(splits: dict[str, Split], cfg: DataConfig,
                 imported: dict[tuple[str, str], str] | None = None) -> dict[str, Split]:
    """train, val, test and holdout: the holdout, then val and test unless the source has them, hashed out of train.

    The holdout comes first so that its membership depends on the seed and `holdout_fraction` only;
    each image's part is hashed from its group's identity (`group_near_duplicates`), or its own identity where
    the source gave no perceptual hashes, never from its resized pixels (see `visionops.data.splits`);
    `imported`: the import record's times (`group_near_duplicates`).
    """
    fractions = {HOLDOUT: cfg.holdout_fraction}
    fractions |= {name: getattr(cfg, f"{name}_fraction") for name in ("val", "test") if name not in splits}
    if sum(fractions.values()) >= 1.0:
        keys = " + ".join(f"data.{name}_fraction" for name in fractions)
        raise ParamsError(f"{keys} = {sum(fractions.values()):g} leaves no images for train; it must be < 1")
    train = splits["train"]
    if len(train.identities) != len(train):
        raise ValueError(f"data.source {cfg.source!r} gave {len(train.identities)} identities for {len(train)} images")
    group_near_duplicates(splits, cfg.near_duplicate_max_distance, imported)
    parts = hash_split(train.groups or train.identities, fractions, cfg.seed)
    carved = {**splits, **{name: _take(train, idx) for name, idx in parts.items()}}
    return {name: carved[name] for name in (*dataset.SPLITS, HOLDOUT)}


def run_download(cfg: DataConfig, out_dir: Path, holdout_dir: Path | None = None,
                 task: str = "classification", targets: str | None = None, imports: Path | None = IMPORTS) -> dict:
    """Load `cfg.source` (with `targets`, `data.sources.TARGETS`, for a dense source), carve the splits, and
    write the dataset of `task` (train/val/test) to `out_dir` and the holdout (one split, "holdout") to
    `holdout_dir`, both atomically and together.

    With no `holdout_dir` the holdout is still kept out of train/val/test, just not written. A dense
    source's per-object facts go beside each split's arrays (`visionops.data.dense.write_tables`). A source of
    files is compared with the last download's record of their SHA-256 (`visionops.data.changes`), which is
    replaced once both directories are written. `imports`: the record of `import-labels` (`data.imports`), whose
    images join a near-duplicate group without renaming it.
    """
    src = load_source(cfg, targets)
    digests = changes.source_digests(src)
    changes.check(cfg, digests, out_dir)
    parts = carve_splits(src.splits, cfg, imported_at(imports))
    if len(parts[HOLDOUT]) < MIN_HOLDOUT:
        print(f"download: warning: the holdout has {len(parts[HOLDOUT])} images (data.holdout_fraction "
              f"{cfg.holdout_fraction:g}); below {MIN_HOLDOUT} its scores are too uncertain for promote and "
              "monitoring to judge a model: add images or raise data.holdout_fraction", file=sys.stderr)
    splits = {n: parts[n] for n in dataset.SPLITS}
    kept = {"task": task, "resize": cfg.resize, "background": src.background}
    outputs = [(out_dir, Dataset(src.class_names, splits, cfg.source, src.rejected, **kept))]
    if holdout_dir is not None:
        outputs.append((holdout_dir, Dataset(src.class_names, {HOLDOUT: parts[HOLDOUT]}, cfg.source, **kept)))
    with contextlib.ExitStack() as stack:  # neither directory is replaced unless both were written
        for path, ds in outputs:
            tmp = stack.enter_context(atomic_dir(path))
            dataset.save(ds, tmp)
            if src.facts:
                from visionops.data.dense import write_tables

                for name, split in ds.splits.items():
                    write_tables(tmp / name, split, src.facts)
    changes.save(cfg, digests, out_dir)
    return {
        "source": cfg.source,
        "classes": len(src.class_names),
        "image_shape": list(parts["train"].images.shape[1:]),
        "splits": {name: len(s) for name, s in parts.items()},
        "rejected": len(src.rejected),
        "ignored_non_images": len(src.ignored),
        "near_duplicate_groups": sum(n > 1 for n in Counter(g for s in parts.values() for g in s.groups).values()),
    }
