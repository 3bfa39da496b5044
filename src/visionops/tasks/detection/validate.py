"""Detection's `validate`: the shared per-image and per-object checks (`visionops.data.dense_validate`) plus
its boxes': every object has a known class and a box inside its image with positive area; and a warning for
images holding more objects than the served model returns (detection.max_detections)."""

from __future__ import annotations

from functools import partial
from pathlib import Path

from visionops.config import DetectionConfig, ValidateConfig
from visionops.data.dense_validate import meta, run_dense_validate


def object_checks(gx, cfg: ValidateConfig, class_names: list[str], max_detections: int) -> dict[str, list]:
    E = gx.expectations
    k = len(class_names)
    return {
        "warning_images": [
            E.ExpectColumnValuesToBeBetween(
                column="objects", max_value=max_detections,
                meta={"check": f"objects per image <= detection.max_detections ({max_detections}), the served cap"}),
        ],
        "critical_objects": [
            E.ExpectColumnValuesToBeInSet(column="class_index", value_set=list(range(k)),
                                          meta=meta(f"object class in the {k} classes", "class")),
            *(E.ExpectColumnValuesToNotBeNull(column=c, meta=meta(f"box has {c}", "box_missing"))
              for c in ("x0", "y0", "x1", "y1")),
            *(E.ExpectColumnValuesToBeBetween(column=c, min_value=0, meta=meta(f"box {c} >= 0", "box_outside"))
              for c in ("x0", "y0")),
            *(E.ExpectColumnPairValuesAToBeGreaterThanB(column_A=side, column_B=c, or_equal=True,
                                                        meta=meta(f"box {c} <= image {side}", "box_outside"))
              for c, side in (("x1", "width"), ("y1", "height"))),
            *(E.ExpectColumnPairValuesAToBeGreaterThanB(column_A=a, column_B=b,
                                                        meta=meta(f"box {a} > {b} (positive area)", "box_area"))
              for a, b in (("x1", "x0"), ("y1", "y0"))),
        ]
    }  # fmt: skip


def run_validate(dataset_dir: Path, cfg: ValidateConfig, out_dir: Path,
                 max_detections: int = DetectionConfig().max_detections) -> dict:
    """Check the detection dataset in `dataset_dir`; write the reports into `out_dir`; return the summary.
    `max_detections`: the served cap (params' detection.max_detections), above which an image's objects warn.

    Raises ValidationFailed (after writing every output) when a critical check fails.
    """
    return run_dense_validate(dataset_dir, cfg, out_dir, partial(object_checks, max_detections=max_detections))
