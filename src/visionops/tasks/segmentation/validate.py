"""Segmentation's `validate`: the shared per-image and per-object checks (`visionops.data.dense_validate`) plus
its masks': each mask has its image's size and only values of the class set (or 255); every object (a
class present in a mask, or a COCO annotation) has a known class (after background, when the class list has
one); the train pixels per class are checked for imbalance (a warning)."""

from __future__ import annotations

from pathlib import Path

from functools import partial

from visionops.config import ValidateConfig
from visionops.data import dataset
from visionops.data.dense_validate import meta, run_dense_validate


def object_checks(gx, cfg: ValidateConfig, class_names: list[str], first: int = 1) -> dict[str, list]:
    """The mask and object suites; objects' classes run from `first` (1: after background)."""
    E = gx.expectations
    k = len(class_names)
    after = " (the classes after background)" if first else ""
    return {
        "critical_objects": [
            E.ExpectColumnValuesToBeInSet(column="class_index", value_set=list(range(first, k)),
                                          meta=meta(f"object class in {first}..{k - 1}{after}", "class")),
        ],
        "critical_images": [
            *(E.ExpectColumnPairValuesToBeEqual(column_A=f"mask_{side}", column_B=f"orig_{side}",
                                                meta=meta(f"mask {side} == image {side}", "mask_size"))
              for side in ("height", "width")),
            E.ExpectColumnValuesToBeInSet(column="mask_unknown_values", value_set=[""],
                                          meta=meta(f"mask values in 0..{k - 1} or 255", "mask_values")),
        ],
    }  # fmt: skip


def run_validate(dataset_dir: Path, cfg: ValidateConfig, out_dir: Path) -> dict:
    """Check the segmentation dataset in `dataset_dir`; write the reports into `out_dir`; return the summary.

    Raises ValidationFailed (after writing every output) when a critical check fails.
    """
    first = int(dataset.load(dataset_dir).background)
    return run_dense_validate(dataset_dir, cfg, out_dir, partial(object_checks, first=first), first_class=first,
                              pixels=True)
