"""Detection metrics: COCO mAP (torchmetrics, faster_coco_eval backend) and the box matching behind
the confusion table and the per-image "fully right" verdict."""

from __future__ import annotations

import numpy as np
import torch

BACKGROUND = "background"
MATCH_IOU = 0.5
# COCO's maxDets: mAP scores up to this many detections per image, whatever the served cap (detection.max_detections)
MAP_MAX_DETECTIONS = 100


def truths(boxes: np.ndarray, labels: np.ndarray) -> list[dict[str, np.ndarray]]:
    """Per image, the true boxes and class ids without the -1 padding."""
    keep = labels >= 0
    return [{"boxes": b[k], "labels": lab[k]} for b, lab, k in zip(boxes, labels, keep)]


def mean_average_precision(predictions: list[dict], true: list[dict], class_names: list[str]) -> dict:
    """COCO mAP@[.5:.95], mAP@.5, mAP@.75, mAR@100, per class AP@.5 (`per_class_ap50`) and AP@[.5:.95]
    (`per_class_ap`) (NaN-free: a class absent from the split gets no entry), and the precision-recall curves
    at IoU .5 per class. Each image's `MAP_MAX_DETECTIONS` best detections are scored."""
    from torchmetrics.detection import MeanAveragePrecision

    metric = MeanAveragePrecision(backend="faster_coco_eval", class_metrics=True, extended_summary=True,
                                  max_detection_thresholds=[1, 10, MAP_MAX_DETECTIONS])
    metric.update(
        [{k: torch.as_tensor(p[k]) for k in ("boxes", "scores", "labels")} for p in predictions],
        [{k: torch.as_tensor(t[k]) for k in ("boxes", "labels")} for t in true],
    )
    r = metric.compute()
    classes = [int(c) for c in torch.atleast_1d(r["classes"])]
    per_class = {class_names[c]: float(ap) for c, ap in zip(classes, torch.atleast_1d(r["map_per_class"])) if ap >= 0}
    # precision: T (IoU thresholds) x R (101 recall points) x K x A (areas) x M (max dets); -1 = undefined
    precision = r["precision"][0, :, :, 0, -1]  # IoU .5, every area, the most detections
    defined = precision[:, : len(classes)] >= 0
    # AP@.5 per class as COCO averages it: the mean precision over the recall points where it is defined
    ap50 = {class_names[c]: float(precision[:, i][defined[:, i]].mean()) for i, c in enumerate(classes) if defined[:, i].any()}
    curves = {class_names[c]: precision[:, i].clamp_min(0).tolist() for i, c in enumerate(classes) if defined[:, i].any()}
    return {
        "map": float(r["map"]),
        "map_50": float(r["map_50"]),
        "map_75": float(r["map_75"]),
        "mar_100": float(r[f"mar_{MAP_MAX_DETECTIONS}"]),
        "per_class_ap50": ap50,
        "per_class_ap": per_class,
        "pr_curves": curves,
    }


def match(pred: dict, true: dict, iou: float = MATCH_IOU) -> tuple[list[tuple[int, int]], list[int], list[int]]:
    """Greedy matching by score: each prediction (best first) takes the unmatched true box it overlaps
    most, at IoU >= `iou`, whatever its class. Returns (true index, prediction index) pairs, the unmatched
    true boxes and the unmatched predictions."""
    from torchvision.ops import box_iou

    n_true, n_pred = len(true["labels"]), len(pred["labels"])
    if n_true == 0 or n_pred == 0:
        return [], list(range(n_true)), list(range(n_pred))
    ious = box_iou(torch.as_tensor(pred["boxes"]), torch.as_tensor(true["boxes"])).numpy()
    taken, pairs, lonely = set(), [], []
    for p in np.argsort(-np.asarray(pred["scores"]), kind="stable"):
        candidates = [(ious[p, t], t) for t in range(n_true) if t not in taken and ious[p, t] >= iou]
        if candidates:
            t = max(candidates)[1]
            taken.add(t)
            pairs.append((t, int(p)))
        else:
            lonely.append(int(p))
    return pairs, [t for t in range(n_true) if t not in taken], sorted(lonely)


def confusion_rows(predictions: list[dict], true: list[dict], class_names: list[str]) -> list[tuple[str, str]]:
    """(actual, predicted) class names per box: matched pairs, missed true boxes as (actual, background)
    and unmatched predictions as (background, predicted)."""
    rows = []
    for pred, t in zip(predictions, true):
        pairs, missed, extra = match(pred, t)
        rows += [(class_names[t["labels"][i]], class_names[pred["labels"][j]]) for i, j in pairs]
        rows += [(class_names[t["labels"][i]], BACKGROUND) for i in missed]
        rows += [(BACKGROUND, class_names[pred["labels"][j]]) for j in extra]
    return rows


def image_correct(pred: dict, true: dict) -> bool:
    """Every true box matched by a prediction of its class, and no prediction left over (`pred` holds
    the served detections, at the served score threshold)."""
    pairs, missed, extra = match(pred, true)
    return not missed and not extra and all(true["labels"][i] == pred["labels"][j] for i, j in pairs)


def image_f1(pred: dict, true: dict) -> float:
    """F1 of one image's served detections: a true box counts as found when `match` pairs it with a
    prediction of its class; 1.0 for an image with neither true boxes nor detections."""
    pairs, _, _ = match(pred, true)
    found = sum(true["labels"][i] == pred["labels"][j] for i, j in pairs)
    total = len(true["labels"]) + len(pred["labels"])
    return 2 * found / total if total else 1.0
