"""Stage `evaluate` for segmentation: the teacher on the test split.

Scored twice: at the training size (`miou`, ...: the canonical masks) and at the source resolution (`source_miou`,
`source_pixel_accuracy`: each image's logits cropped to where its image lies in the square, upsampled to its source
mask's size, against the source mask, on the test images download kept it for, `source_images`).

Writes to `reports_dir`: metrics.json (`HEADLINE`), details.json, per_class.json (IoU, Dice, pixels per
class), predictions.csv (`actual,predicted` class names of a seeded sample of test pixels, for DVC's
confusion plot), figures/overlays.png, figures/per_class_iou.png, figures/eigencam.png (EigenCAM, for the U-Nets)
and figures/membership_roc.png (the membership audit, `evaluation.membership`, on `segmentation.membership`'s
per-image signals), report.md/.html; timings (latency) go to measured.json.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

import numpy as np
import torch

from visionops import atomic, measured
from visionops.config import EvaluateConfig, SegmentationConfig
from visionops.data import dataset
from visionops.errors import InvalidInputError
from visionops.evaluation import membership, report_html
from visionops.evaluation.eigencam import eigencam
from visionops.evaluation.latency import measure_latency, model_size_bytes
from visionops.models import count_parameters
from visionops.tasks.segmentation import membership as member_signals
from visionops.tasks.segmentation import plots, segmenter
from visionops.tasks.segmentation.metrics import confusion, image_miou, miou_from_confusion, segmentation_metrics
from visionops.training.device import select_device

HEADLINE = ("miou", "pixel_accuracy", "dice", "source_miou", *membership.HEADLINE)
SAMPLE_PIXELS = 4000
SEED = 0


def sample_pixels(truth: np.ndarray, pred: np.ndarray, class_names: list[str], n: int = SAMPLE_PIXELS, seed: int = SEED) -> str:
    """predictions.csv: `actual,predicted` class names of `n` seeded random non-ignored pixels."""
    flat_t, flat_p = truth.reshape(-1), pred.reshape(-1)
    keep = np.flatnonzero(flat_t != segmenter.IGNORE)
    pick = np.sort(np.random.default_rng(seed).choice(keep, size=min(n, len(keep)), replace=False))
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["actual", "predicted"])
    writer.writerows([class_names[flat_t[i]], class_names[flat_p[i]]] for i in pick)
    return buf.getvalue()


CORRECT_MIOU = 0.5  # an image is right (promotion's paired test) when its own mIoU reaches this, as a box must reach IoU 0.5


def score_masks(pred: np.ndarray, truth: np.ndarray, class_names: list[str], correct_miou: float) -> dict:
    """The segmentation metrics, plus each image's own mIoU and whether it reaches `correct_miou`."""
    p, t = torch.from_numpy(np.asarray(pred)), torch.from_numpy(np.asarray(truth))
    m = segmentation_metrics(p, t, class_names)
    per_image = image_miou(p, t, len(class_names))
    m["image_miou"] = per_image
    m["correct"] = [bool(v >= correct_miou) for v in per_image]
    return m


def score_at_source(model, images, placements: list, truths: list[np.ndarray], num_classes: int, device,
                    batch_size: int) -> dict:
    """mIoU and pixel accuracy at the source resolution of the first len(truths) `images`: each one's logits
    mapped to its source size (`segmenter.source_mask`, as served) against its source mask `truths[i]`."""
    cm = torch.zeros(num_classes, num_classes, dtype=torch.int64)
    for start in range(0, len(truths), batch_size):
        logits = segmenter.predict_logits(model, images[start : start + batch_size], device, batch_size)
        for i, x in enumerate(logits, start):
            pred = segmenter.source_mask(x, placements[i])
            cm += confusion(torch.from_numpy(pred), torch.from_numpy(np.asarray(truths[i])), num_classes)
    total = int(cm.sum())
    return {"source_miou": miou_from_confusion(cm) if total else None,
            "source_pixel_accuracy": float(cm.diagonal().sum() / total) if total else None,
            "source_images": len(truths)}


def _fmt(x) -> str:
    return "n/a" if x is None else f"{x:.4f}"


def render_report(m: dict, arch: str, correct_miou: float, has_cam: bool, roc_figure: str | None = None) -> str:
    lines = [
        f"# Evaluation of `{arch}` (segmentation, test split)", "",
        f"- mIoU (mean over classes, background included): **{m['miou']:.4f}**",
        f"- pixel accuracy: {m['pixel_accuracy']:.4f}; Dice (mean over classes): {m['dice']:.4f}",
        f"- images whose own mIoU >= {correct_miou}: {m['images_correct']}/{m['images']}",
        f"- at the source resolution ({m['source_images']} test images, predictions upsampled to each source mask): "
        f"mIoU {_fmt(m['source_miou'])}, pixel accuracy {_fmt(m['source_pixel_accuracy'])}; the numbers above are "
        "at the training size",
        f"- parameters: {m['parameters']}; size: {m['size_bytes']} bytes", "",
        "| class | IoU | Dice | pixels |", "|---|---|---|---|",
        *(f"| {c} | {_fmt(v['iou'])} | {_fmt(v['dice'])} | {v['pixels']} |" for c, v in m["per_class"].items()),
        "", "![per-class IoU](figures/per_class_iou.png)", "",
        "![true and predicted masks](figures/overlays.png)", "",
    ]  # fmt: skip
    if has_cam:
        lines += ["## Explanations (EigenCAM)", "",
                  "The first principal component of the decoder's stride-4 features (no gradients): where the network looks.",
                  "", "![EigenCAM on the stride-4 decoder features](figures/eigencam.png)", ""]
    lines += membership.report_section(m, roc_figure)
    return "\n".join(lines)


def run_evaluate(dataset_dir: Path, model_path: Path, cfg: EvaluateConfig, reports_dir: Path, batch_size: int,
                 device_name: str, seg: SegmentationConfig, holdout_dir: Path | None = None) -> dict:
    correct_miou = CORRECT_MIOU
    reports_dir = Path(reports_dir)
    device = select_device(device_name)
    ds = dataset.load(dataset_dir)
    model, info = segmenter.load(model_path, device)
    if info["class_names"] != ds.class_names or tuple(info["image_shape"]) != ds.image_shape:
        raise InvalidInputError(f"{model_path}: trained on classes {info['class_names']} / shape {info['image_shape']}, "
                                f"but {dataset_dir} has {ds.class_names} / {list(ds.image_shape)}; retrain")
    test = ds.splits["test"]
    truth = np.asarray(test.targets["masks"])
    pred = segmenter.predict_masks(model, test.images, device, batch_size)
    m = score_masks(pred, truth, ds.class_names, correct_miou)
    at_source = score_at_source(model, test.images, ds.placements("test"), dataset.source_masks(dataset_dir),
                                len(ds.class_names), device, batch_size)
    per_class = m.pop("per_class")
    m.pop("image_miou")
    correct = m.pop("correct")
    audit, curves = membership.audit_splits(member_signals.signals(model, device, batch_size), ds.splits["train"],
                                            membership.load_nonmembers(holdout_dir, ds.class_names, ds.image_shape))
    latency = measure_latency(model, ds.image_shape, device, cfg.latency_batch_size)
    result = {
        "model": info["arch"], **m, "images": len(correct), "images_correct": int(sum(correct)), **at_source,
        "parameters": count_parameters(model), "size_bytes": model_size_bytes(model),
        "latency_batch_ms": latency["batch_ms"], "latency_single_image_ms": latency["single_image_ms"], **audit,
    }  # fmt: skip
    figures = reports_dir / "figures"
    figures.mkdir(parents=True, exist_ok=True)
    if curves:
        membership.roc_figure(curves, audit, figures / membership.FIGURE, f"Membership inference: {info['arch']}")
    shown = np.random.default_rng(SEED).choice(len(truth), size=min(seg.overlay_images, len(truth)), replace=False)
    plots.overlays(np.asarray(test.images)[np.sort(shown)], truth[np.sort(shown)], pred[np.sort(shown)], ds.class_names, figures / "overlays.png",
                  ds.background)
    plots.per_class_iou(per_class, figures / "per_class_iou.png", f"{info['arch']}: test IoU per class")
    layer = getattr(model.net, "up4", None)  # the U-Net's stride-4 decoder (torchvision's nets: none)
    has_cam = cfg.gradcam_samples > 0 and layer is not None
    if has_cam:
        n = cfg.gradcam_samples
        eigencam(model.cpu(), layer, np.asarray(test.images[:n]), figures / "eigencam.png", "EigenCAM", objects=pred[:n] > 0)
    atomic.write_text(reports_dir / "predictions.csv", sample_pixels(truth, pred, ds.class_names))
    atomic.write_json(reports_dir / "per_class.json", per_class)
    measured.write_reports(reports_dir, {**result, "per_class": per_class}, HEADLINE)
    atomic.write_text(reports_dir / "report.md", render_report({**result, "per_class": per_class}, info["arch"], correct_miou, has_cam,
                                                                 membership.FIGURE if curves else None))
    report_html.write(reports_dir / "report.md", "visionops evaluation")
    return result
