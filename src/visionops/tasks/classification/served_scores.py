"""Classification's scores of a served model (the registered pyfunc) on a dataset split: what
promotion and monitoring judge by."""

from __future__ import annotations

import numpy as np

from visionops.config import EvaluateConfig
from visionops.data import dataset
from visionops.evaluation.calibration import expected_calibration_error
from visionops.serving.pyfunc import PROB_PREFIX, ImageClassifierModel
from visionops.tasks.classification.metrics import classification_metrics


def score_served(
    model: ImageClassifierModel, split: dataset.Split, ds: dataset.Dataset, cfg: EvaluateConfig
) -> tuple[dict, np.ndarray]:
    """(metrics, per-image correctness) of the served predictions: its labels and its probabilities."""
    frame = model.predict_canonical(np.asarray(split.images))
    probs = frame[[PROB_PREFIX + c for c in model.class_names]].to_numpy(dtype=np.float64)
    labels = np.asarray(split.labels)
    m = classification_metrics(labels, probs, ds.class_names, top_k=cfg.top_k)
    metrics = {
        "n": m["n"],
        "accuracy": m["accuracy"],
        "balanced_accuracy": m["balanced_accuracy"],
        "macro_f1": m["macro_f1"],
        # a class absent from the holdout has no recall to gate on
        "per_class_recall": {c: v["recall"] for c, v in m["per_class"].items() if v["support"]},
        "ece": expected_calibration_error(probs, labels, cfg.calibration_bins),
        "latency_batch_size": cfg.latency_batch_size,
    }
    return metrics, frame["label_index"].to_numpy() == labels
