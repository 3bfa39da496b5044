"""Stage `evaluate`: the trained model on the held-out test split.

Writes to `reports_dir` (each file atomically; metrics.json last, so its presence means a full run):

    metrics.json            the DVC metrics (`HEADLINE`): accuracy, balanced accuracy, macro F1, the
                            ECE of the served (temperature-scaled) model, and the membership-inference
                            audit's AUC and TPR at 1% FPR (`evaluation.membership`, its stronger attack)
    details.json            every figure but the timings: also top-k accuracy, ECE before temperature
                            scaling, the temperature and test-time augmentation, NLL, size, device,
                            each membership attack's figures (timings go to measured.json)
    per_class.json          precision, recall, F1, support, accuracy per class
    predictions.csv         path, actual, predicted (class names), confidence (DVC confusion plot)

Everything is judged on the served predictor (`classifier.predict_logits`: the model file's
test-time augmentation and temperature, fitted on val where the model was made); "before" ECE and
NLL are the same predictions without the temperature.
    figures/                (a DVC plots directory; DVC draws the confusion matrix from predictions.csv)
      reliability.png         reliability diagrams before / after temperature scaling
      membership_roc.png      the membership-inference attacks' ROC (train members against the holdout)
      per_class_accuracy.png  bar chart
      gradcam_correct.png     Grad-CAM overlays of correctly classified test images
      gradcam_wrong.png       Grad-CAM overlays of the most confident mistakes
      misclassified.png       gallery of misclassified test images
    report.md               Markdown report tying the above together
    report.html             the same with the figures embedded (MLflow's artifact viewer renders it)
"""

from __future__ import annotations

import csv
import io
import sys
from pathlib import Path

import numpy as np

from visionops import atomic, measured
from visionops.config import EvaluateConfig
from visionops.data import dataset
from visionops.errors import VisionopsError
from visionops.evaluation import calibration, membership, report_html
from visionops.evaluation.latency import measure_latency, model_size_bytes
from visionops.models import count_parameters
from visionops.tasks.classification import classifier, eval_plots, explain
from visionops.tasks.classification import membership as member_signals
from visionops.tasks.classification.metrics import classification_metrics, confusion
from visionops.training.device import select_device

FIGURES = {
    "reliability.png": "Reliability diagram",
    "per_class_accuracy.png": "Per-class accuracy",
    "gradcam_correct.png": "Grad-CAM: correctly classified",
    "gradcam_wrong.png": "Grad-CAM: misclassified",
    "misclassified.png": "Misclassified gallery",
}
# what `dvc metrics show` shows (it must fit a terminal): ece_calibrated is the served model's ECE
HEADLINE = ("accuracy", "balanced_accuracy", "macro_f1", "ece_calibrated", *membership.HEADLINE)
OUTPUTS = ("metrics.json", "details.json", "per_class.json", "predictions.csv", *(f"figures/{f}" for f in FIGURES),
           f"figures/{membership.FIGURE}", "report.md", "report.html")
TOP_CONFUSIONS = 10
BOOTSTRAP_RESAMPLES = 200  # paired bootstrap of the ECE change (seeded: the report is the same every run)
NOISE_SE = 2.0  # a change within this many standard errors is reported as within noise


class EvaluationError(VisionopsError):
    """The model and the dataset do not fit together, or there is nothing to evaluate."""


def _check_compatible(ds: dataset.Dataset, info: dict, model_path: Path, dataset_dir: Path) -> None:
    if list(info["class_names"]) != list(ds.class_names):
        raise EvaluationError(
            f"{model_path} was trained on classes {info['class_names']} but {dataset_dir} has {ds.class_names}"
        )
    if tuple(info["image_shape"]) != tuple(ds.image_shape):
        raise EvaluationError(
            f"{model_path} expects images of shape {tuple(info['image_shape'])} (H, W, C) "
            f"but {dataset_dir} holds {tuple(ds.image_shape)}"
        )
    if "test" not in ds.splits or len(ds.splits["test"]) == 0:
        raise EvaluationError(f"{dataset_dir} has no test images (data.test_fraction is 0?)")


def predictions_csv(
    paths: list[str], y_true: np.ndarray, y_pred: np.ndarray, confidence: np.ndarray, class_names: list[str]
) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["path", "actual", "predicted", "confidence"])
    for p, t, q, c in zip(paths, y_true, y_pred, confidence):
        writer.writerow([p, class_names[t], class_names[q], f"{c:.6f}"])
    return buf.getvalue()


def top_confusions(cm: np.ndarray, class_names: list[str], limit: int = TOP_CONFUSIONS) -> list[dict]:
    """The most frequent (actual → predicted) mistakes."""
    off = cm.copy()
    np.fill_diagonal(off, 0)
    pairs = sorted(((int(off[i, j]), i, j) for i, j in zip(*np.nonzero(off))), key=lambda t: (-t[0], t[1], t[2]))
    return [{"actual": class_names[i], "predicted": class_names[j], "count": c} for c, i, j in pairs[:limit]]


PHASES = ("predicting", "membership", "latency", "plots", "Grad-CAM", "report")


class _Phases:
    """A bar over the stage's phases on stderr (off when stderr is not a terminal, as tqdm decides)."""

    def __init__(self):
        from tqdm import tqdm

        self.bar = tqdm(total=len(PHASES), desc="evaluate", unit="phase", leave=False, disable=None, file=sys.stderr)
        self.started = False

    def __call__(self, name: str) -> None:
        self.bar.set_postfix_str(name, refresh=not self.started)
        if self.started:
            self.bar.update(1)  # the phase before it is done
        self.started = True

    def close(self) -> None:
        self.bar.update(1)
        self.bar.close()


def ece_change(probs_raw: np.ndarray, probs: np.ndarray, y: np.ndarray, bins: int,
               resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0) -> dict:
    """ECE after minus before temperature scaling, with the standard error of that change under a paired
    bootstrap over the test images (the same resampled images for both), and a plain-words verdict."""
    before = calibration.expected_calibration_error(probs_raw, y, bins)
    after = calibration.expected_calibration_error(probs, y, bins)
    rng = np.random.default_rng(seed)
    diffs = []
    for _ in range(resamples if len(y) > 1 else 0):
        i = rng.integers(0, len(y), len(y))
        diffs.append(calibration.expected_calibration_error(probs[i], y[i], bins)
                     - calibration.expected_calibration_error(probs_raw[i], y[i], bins))
    change = after - before
    se = float(np.std(diffs, ddof=1)) if len(diffs) > 1 else float("nan")
    if not np.isfinite(se) or abs(change) <= NOISE_SE * se:
        verdict = "within noise"
    else:
        verdict = "lower (better calibrated)" if change < 0 else "higher (worse calibrated)"
    return {"before": before, "after": after, "change": change, "se": se, "resamples": len(diffs), "verdict": verdict}


def calibration_sentence(e: dict, n: int) -> str:
    """The ECE change in words: never called an improvement unless it is lower beyond the noise."""
    direction = "unchanged" if e["change"] == 0 else ("lower" if e["change"] < 0 else "higher")
    text = (f"Temperature scaling left the ECE {direction}: {e['before']:.4f} → {e['after']:.4f} "
            f"(change {e['change']:+.4f}; paired bootstrap standard error {_fmt(e['se'])} over {e['resamples']} "
            f"resamples of the {n} test images). ")
    if e["verdict"] == "within noise":
        return text + (f"That is within binning noise (|change| ≤ {NOISE_SE:g} standard errors): "
                       "neither better nor worse calibrated on this test set.")
    return text + f"Beyond {NOISE_SE:g} standard errors, so the served probabilities are {e['verdict']} on this test set."


def _fmt(x, digits: int = 4) -> str:
    if x is None:
        return "n/a"
    if isinstance(x, float):
        return "n/a" if np.isnan(x) else f"{x:.{digits}f}"
    return str(x)


def render_report(metrics: dict, per_class: dict, confusions: list[dict], arch: str, ece_noise: dict | None = None,
                  roc_figure: str | None = None) -> str:
    m = metrics
    lines = [
        f"# Evaluation report: `{arch}` on the test split",
        "",
        f"{m['test_images']} test images, {m['num_classes']} classes, evaluated on `{m['device']}`.",
        "",
        "## Headline metrics",
        "",
        "| metric | value |",
        "|---|---|",
        f"| accuracy | {_fmt(m['accuracy'])} |",
        f"| balanced accuracy | {_fmt(m['balanced_accuracy'])} |",
        f"| macro F1 | {_fmt(m['macro_f1'])} |",
        f"| top-{m['top_k']} accuracy | {_fmt(m['top_k_accuracy'])} |",
        f"| ECE ({m['calibration_bins']} bins) | {_fmt(m['ece'])} |",
        f"| ECE with the served temperature | {_fmt(m['ece_calibrated'])} |",
        f"| NLL | {_fmt(m['nll'])} |",
        "",
        "## Per-class results",
        "",
        "| class | precision | recall | F1 | support |",
        "|---|---|---|---|---|",
    ]
    lines += [
        f"| {name} | {_fmt(r['precision'])} | {_fmt(r['recall'])} | {_fmt(r['f1'])} | {r['support']} |"
        for name, r in per_class.items()
    ]
    lines += ["", "![Per-class accuracy](figures/per_class_accuracy.png)", "", "## Confusion matrix", "",
              "`dvc plots show` draws the whole matrix from predictions.csv (actual against predicted class).", ""]  # fmt: skip
    if confusions:
        lines += ["Most frequent mistakes:", "", "| actual | predicted | count |", "|---|---|---|"]
        lines += [f"| {c['actual']} | {c['predicted']} | {c['count']} |" for c in confusions]
        lines.append("")
    lines += [
        "## Calibration",
        "",
        (
            f"The served model divides its logits (test-time augmentation: `{m['tta']}`) by T = "
            f"{m['temperature']:.4f}, fitted on the validation split when the model was trained by minimising "
            "the negative log-likelihood (T = 1 without validation images); predictions (and accuracy) are "
            "unchanged. All other figures here are of the served, temperature-scaled model."
        ),
        "",
        "| | uncalibrated | temperature scaled |",
        "|---|---|---|",
        f"| ECE | {_fmt(m['ece'])} | {_fmt(m['ece_calibrated'])} |",
        f"| NLL | {_fmt(m['nll'])} | {_fmt(m['nll_calibrated'])} |",
        "",
        *([calibration_sentence(ece_noise, m["test_images"]), ""] if ece_noise else []),
        "![Reliability diagram](figures/reliability.png)",
        "",
        *membership.report_section(metrics, roc_figure),
        "## Size",
        "",
        "| | |",
        "|---|---|",
        f"| parameters | {m['parameters']:,} |",
        f"| model size (state dict) | {m['model_size_bytes'] / 1024:.1f} KiB |",
        f"| device | `{m['device']}` |",
        "",
        (
            f"Latency and throughput of the served model (TTA `{m['tta']}`, batch of {m['latency_batch_size']}) "
            f"depend on the machine and its load, so they are not in this report, which DVC hashes: see "
            f"`{measured.MEASURED_FILE}` beside it and the stage's MLflow run."
        ),
        "",
        "## Explanations",
        "",
        "Grad-CAM heat-maps of the predicted class on the last spatial convolution (red = most evidence).",
        "",
        "### Correctly classified",
        "",
        "![Grad-CAM: correctly classified](figures/gradcam_correct.png)",
        "",
        "### Misclassified (most confident mistakes)",
        "",
        "![Grad-CAM: misclassified](figures/gradcam_wrong.png)",
        "",
        "## Misclassified gallery",
        "",
        "![Misclassified gallery](figures/misclassified.png)",
        "",
    ]
    return "\n".join(lines)


def run_evaluate(
    dataset_dir: Path,
    model_path: Path,
    cfg: EvaluateConfig,
    reports_dir: Path,
    eval_batch_size: int = 1024,
    device: str = "auto",
    holdout_dir: Path | None = None,
) -> dict:
    """Evaluate the model at `model_path` on the test split of `dataset_dir`, and audit it for membership
    inference (its train split against the frozen holdout in `holdout_dir`); returns the stage's result."""
    dataset_dir, model_path, reports_dir = Path(dataset_dir), Path(model_path), Path(reports_dir)
    dev = select_device(device)
    model, info = classifier.load(model_path, dev)
    ds = dataset.load(dataset_dir)
    _check_compatible(ds, info, model_path, dataset_dir)
    names = list(ds.class_names)
    test = ds.splits["test"]
    y = np.asarray(test.labels, dtype=np.int64)
    phase = _Phases()
    phase("predicting")

    raw32 = classifier.predict_logits(model, test.images, dev, eval_batch_size, calibrated=False)
    temperature = float(info["temperature"])
    raw, logits = raw32.double().numpy(), (raw32 / temperature).double().numpy()  # logits: what is served
    probs_raw = calibration.probabilities(raw)
    probs = calibration.probabilities(logits)
    pred, conf = probs.argmax(1), probs.max(1)

    cls = classification_metrics(y, logits, names, cfg.top_k)
    per_class = cls.pop("per_class")
    bins = cfg.calibration_bins
    ece, ece_cal = (calibration.expected_calibration_error(p, y, bins) for p in (probs_raw, probs))
    phase("membership")
    audit, curves = membership.audit_splits(
        member_signals.signals(model, dev, eval_batch_size), ds.splits["train"],
        membership.load_nonmembers(holdout_dir, names, ds.image_shape),
    )  # fmt: skip
    phase("latency")
    latency = measure_latency(classifier.Served(model), ds.image_shape, dev, batch_size=cfg.latency_batch_size)
    metrics = {
        "model": info["arch"],
        "test_images": cls["n"],
        "num_classes": len(names),
        "accuracy": cls["accuracy"],
        "balanced_accuracy": cls["balanced_accuracy"],
        "macro_f1": cls["macro_f1"],
        "top_k": cls["top_k"],
        "top_k_accuracy": cls["top_k_accuracy"],
        "calibration_bins": bins,
        "ece": ece,
        "ece_calibrated": ece_cal,
        "temperature": temperature,
        "tta": info["tta"],
        "nll": calibration.nll(raw, y),
        "nll_calibrated": calibration.nll(logits, y),
        "device": latency["device"],
        "latency_batch_size": latency["batch_size"],
        "latency_batch_ms": latency["batch_ms"],
        "latency_single_image_ms": latency["single_image_ms"],
        "images_per_second": latency["images_per_second"],
        "parameters": count_parameters(model),
        "model_size_bytes": model_size_bytes(model),
        **audit,
    }

    phase("plots")
    figures = reports_dir / "figures"  # every task's evaluate puts its images here (a DVC plots directory)
    figures.mkdir(parents=True, exist_ok=True)
    cm = confusion(y, pred, len(names))
    atomic.write_text(reports_dir / "predictions.csv", predictions_csv(test.paths, y, pred, conf, names))
    atomic.write_json(reports_dir / "per_class.json", per_class)
    eval_plots.reliability_diagram(
        calibration.reliability_bins(probs_raw, y, bins),
        calibration.reliability_bins(probs, y, bins),
        ece, ece_cal, temperature, figures / "reliability.png",
    )  # fmt: skip
    eval_plots.per_class_accuracy(
        names, [r["accuracy"] for r in per_class.values()], [r["support"] for r in per_class.values()],
        figures / "per_class_accuracy.png", overall=metrics["accuracy"],
    )  # fmt: skip
    if curves:
        membership.roc_figure(curves, audit, figures / membership.FIGURE, f"Membership inference: {info['arch']}")
    phase("Grad-CAM")
    explain.explain_predictions(
        model, test.images, y, probs, names, figures, cfg.gradcam_samples, cfg.gallery_size, dev
    )
    phase("report")
    atomic.write_text(
        reports_dir / "report.md",
        render_report(metrics, per_class, top_confusions(cm, names), info["arch"], ece_change(probs_raw, probs, y, bins),
                      membership.FIGURE if curves else None),
    )
    report_html.write(reports_dir / "report.md", f"Evaluation: {info['arch']}")
    measured.write_reports(reports_dir, metrics, HEADLINE)
    phase.close()
    return metrics
