"""Stage `evaluate` for detection: the teacher on the test split.

Scored at the training size (`map_50`, `map`: canonical boxes) and at the source resolution (`source_map_50`,
`source_map`: the detections mapped back to each image's source pixels, as served, against the source boxes of
objects.csv). IoU is unchanged by the per-axis scaling and shift either resize applies, so the two agree but for
float rounding; a difference says a box was mapped wrongly.

Writes to `reports_dir`: metrics.json (`HEADLINE`: mAP@.5, mAP@[.5:.95]), details.json, measured.json
(latency), per_class.json (per class: `ap50` AP@.5, `ap` AP@[.5:.95]), predictions.csv (actual,predicted
per box, `metrics.confusion_rows`, for DVC's confusion plot), figures/ (precision-recall curves, test
images with boxes, EigenCAM, the membership-inference ROC), report.md and report.html. The membership
audit (`evaluation.membership`) reads each image's found confidence (`detection.membership`).
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

import numpy as np
import torch

from visionops import atomic, measured
from visionops.config import DetectionConfig, EvaluateConfig
from visionops.data import dataset
from visionops.data.dense import box_is_sane
from visionops.evaluation import membership, report_html
from visionops.evaluation.eigencam import eigencam
from visionops.evaluation.latency import measure_latency, model_size_bytes
from visionops.models import count_parameters
from visionops.tasks.detection import detector, figures
from visionops.tasks.detection import membership as member_signals
from visionops.tasks.detection.metrics import (
    MAP_MAX_DETECTIONS,
    confusion_rows,
    image_correct,
    mean_average_precision,
    truths,
)

HEADLINE = ("map_50", "map", "source_map_50", *membership.HEADLINE)


def score_split(model: detector.Detector, split: dataset.Split, class_names: list[str], batch_size: int = 256) -> dict:
    """mAP (the ranked detections: above the rule's mAP score threshold, up to `MAP_MAX_DETECTIONS` per image)
    and the served-threshold verdicts of `model` on `split`; also returns both prediction lists."""
    ranked = detector.predict(model, split.images, batch_size=batch_size, ranked=True)
    return score_detections(ranked, split, class_names, model.rule)


def score_detections(ranked: list[detector.Detection], split: dataset.Split, class_names: list[str],
                     rule: DetectionConfig) -> dict:
    """mAP of `ranked` (every image's ranked detections, best first) against `split`'s boxes, and the verdicts
    of the served ones: those scoring at least the rule's score threshold, up to its max_detections (NMS keeps
    a box whatever the boxes scoring below it, so these are what the served model returns); also returns the
    prediction lists."""
    true = truths(split.targets["boxes"], split.targets["box_labels"])
    served = [{k: v[p["scores"] >= rule.score_threshold][: rule.max_detections] for k, v in p.items()} for p in ranked]
    result = mean_average_precision(ranked, true, class_names)
    correct = [image_correct(p, t) for p, t in zip(served, true)]
    result["image_accuracy"] = float(np.mean(correct)) if correct else 0.0
    return {**result, "ranked": ranked, "served": served, "true": true, "correct": correct}


def source_truths(split_dir: Path, split: dataset.Split) -> list[dict[str, np.ndarray]]:
    """Per image of the stored split, its objects' boxes in source pixels and classes (objects.csv), those the
    canonical boxes were made of: a known class and a sane box (`dense.box_is_sane`)."""
    boxes: list[list] = [[] for _ in range(len(split))]
    labels: list[list] = [[] for _ in range(len(split))]
    with (split_dir / "objects.csv").open(newline="") as fh:
        for row in csv.DictReader(fh):
            i, c = int(row["index"]), int(row["class_index"])
            box = tuple(float(row[k] or "nan") for k in ("x0", "y0", "x1", "y1"))
            if c >= 0 and box_is_sane(box, *split.orig_shapes[i][:2]):
                boxes[i].append(box)
                labels[i].append(c)
    return [{"boxes": np.asarray(b, np.float32).reshape(-1, 4), "labels": np.asarray(lab, np.int64)}
            for b, lab in zip(boxes, labels)]


def score_at_source(ranked: list[detector.Detection], placements: list, true: list[dict], class_names: list[str]) -> dict:
    """mAP@.5 and mAP@[.5:.95] of `ranked` (canonical pixels) mapped to source pixels (`Placement.boxes_to_source`)
    against the source boxes `true`."""
    mapped = [{**p, "boxes": w.boxes_to_source(p["boxes"]).astype(np.float32)} for p, w in zip(ranked, placements)]
    r = mean_average_precision(mapped, true, class_names)
    return {"source_map_50": r["map_50"], "source_map": r["map"]}


def _predictions_csv(rows: list[tuple[str, str]]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["actual", "predicted"])
    writer.writerows(rows)
    return buf.getvalue()


def _report(m: dict, class_names: list[str], has_cam: bool, roc_figure: str | None) -> str:
    lines = [
        f"# Evaluation: {m['model']} on the test split ({m['test_images']} images, {m['test_objects']} objects)", "",
        "| metric | value |", "|---|---|",
        f"| mAP@.5 | {m['map_50']:.4f} |", f"| mAP@[.5:.95] (COCO) | {m['map']:.4f} |",
        f"| mAP@.5 at the source resolution | {m['source_map_50']:.4f} |",
        f"| mAP@[.5:.95] at the source resolution | {m['source_map']:.4f} |",
        f"| mAP@.75 | {m['map_75']:.4f} |", f"| mAR@{MAP_MAX_DETECTIONS} | {m['mar_100']:.4f} |",
        f"| images fully right at score >= {m['score_threshold']} | {m['image_accuracy']:.4f} |",
        f"| parameters | {m['parameters']} |", f"| model size (state dict) | {m['model_size_bytes'] / 1024:.1f} KiB |",
        "", ("mAP from torchmetrics' `MeanAveragePrecision` (faster_coco_eval backend) on the detections scoring "
             f"at least {m['map_score_threshold']}, after batched NMS at IoU {m['iou_threshold']}, up to COCO's "
             f"{MAP_MAX_DETECTIONS} per image (the served cap, detection.max_detections = {m['max_detections']}, "
             "applies to the served detections only). The first two rows are at the training size "
             f"({m['image_size']}x{m['image_size']}, {m['resize']}); the source-resolution rows map the detections "
             "back to each image's own pixels against its source boxes. Latency: see measured.json (machine-dependent)."), "",
        "## Per-class AP", "", "| class | AP@.5 | AP@[.5:.95] |", "|---|---|---|",
        *[f"| {c} | {m['per_class_ap50'].get(c, float('nan')):.4f} | {m['per_class_ap'].get(c, float('nan')):.4f} |"
          for c in class_names],
        "", "![Precision-recall curves at IoU .5](figures/pr_curves.png)", "",
        "## Test images", "", "![Predicted and true boxes](figures/detections.png)", "",
        ("The confusion table (predictions.csv) pairs each true box with the prediction matched to it at IoU >= 0.5 "
         "(or `background` when none is), and each unmatched prediction with `background`."), "",
    ]
    if has_cam:
        lines += ["## Explanations (EigenCAM)", "", "![EigenCAM on the stride-4 features](figures/eigencam.png)", ""]
    lines += membership.report_section(m, roc_figure)
    return "\n".join(lines)


def run_evaluate(dataset_dir: Path, model_path: Path, cfg: EvaluateConfig, reports_dir: Path, batch_size: int = 256,
                 holdout_dir: Path | None = None) -> dict:
    ds = dataset.load(dataset_dir)
    test = ds.splits["test"]
    model, info = detector.load(model_path)
    names = info["class_names"]
    scored = score_split(model, test, names, batch_size)
    audit, curves = membership.audit_splits(member_signals.signals(model, batch_size), ds.splits["train"],
                                            membership.load_nonmembers(holdout_dir, names, ds.image_shape))
    latency = measure_latency(detector.Detect(model), ds.image_shape, torch.device("cpu"), batch_size=cfg.latency_batch_size)
    rule = model.rule
    metrics = {
        "model": info["arch"],
        "test_images": len(test),
        "test_objects": int((test.targets["box_labels"] >= 0).sum()),
        **{k: scored[k] for k in ("map_50", "map", "map_75", "mar_100", "image_accuracy", "per_class_ap50", "per_class_ap")},
        **score_at_source(scored["ranked"], ds.placements("test"), source_truths(Path(dataset_dir) / "test", test), names),
        "image_size": ds.image_shape[0],
        "resize": ds.resize,
        **rule.model_dump(),
        "parameters": count_parameters(model),
        "model_size_bytes": model_size_bytes(model),
        "latency_batch_size": latency["batch_size"],
        "latency_batch_ms": latency["batch_ms"],
        "latency_single_image_ms": latency["single_image_ms"],
        "images_per_second": latency["images_per_second"],
        **audit,
    }
    fig_dir = reports_dir / "figures"
    if curves:
        membership.roc_figure(curves, audit, fig_dir / membership.FIGURE, f"Membership inference: {info['arch']}")
    figures.pr_curves(scored["pr_curves"], scored["per_class_ap50"], fig_dir / "pr_curves.png",
                      f"Precision-recall at IoU .5: {info['arch']}")
    shown = np.arange(min(cfg.gallery_size, len(test), 24))
    figures.boxes_drawn(test.images[shown], [scored["served"][i] for i in shown], [scored["true"][i] for i in shown],
                        names, fig_dir / "detections.png", f"{info['arch']}, score >= {rule.score_threshold}")
    layer = getattr(model.net, "fuse", None)  # the CenterNet's fused stride-4 features (torchvision's nets: none)
    has_cam = cfg.gradcam_samples > 0 and layer is not None
    if has_cam:
        eigencam(model, layer, np.asarray(test.images[: cfg.gradcam_samples]), fig_dir / "eigencam.png", "EigenCAM",
                 class_maps=lambda out: out[:, : model.net.num_classes])
    per_class = {c: {"ap50": scored["per_class_ap50"][c], "ap": scored["per_class_ap"][c]} for c in scored["per_class_ap"]}
    atomic.write_json(reports_dir / "per_class.json", per_class)
    atomic.write_text(reports_dir / "predictions.csv", _predictions_csv(confusion_rows(scored["served"], scored["true"], names)))
    atomic.write_text(reports_dir / "report.md", _report(metrics, names, has_cam, membership.FIGURE if curves else None))
    report_html.write(reports_dir / "report.md", f"Evaluation: {info['arch']}")
    measured.write_reports(reports_dir, metrics, HEADLINE)
    return metrics
