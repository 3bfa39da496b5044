"""Label-free estimates of the headline metric on a window, from its confidences and the reference's.

- Classification: ATC, average thresholded confidence (Garg et al., ICLR 2022). The threshold t is set on
  the reference so that its share of confidences above t equals its accuracy (the mean of its per-image
  `score`, 1.0 correct / 0.0 wrong); the window's estimated accuracy is its share of confidences above t.
- Detection and segmentation: DoC, difference of confidences (Guillory et al., ICCV 2021). The estimate is
  the reference's mean `score` (per-image F1 at IoU 0.5; pixel accuracy) minus the drop in mean confidence.
"""

from __future__ import annotations

import numpy as np

METRICS = {"classification": "accuracy", "detection": "f1@0.5", "segmentation": "pixel_accuracy"}


def atc(ref_confidence: np.ndarray, ref_score: np.ndarray, confidence: np.ndarray) -> dict:
    """ATC's estimate of the window's accuracy (see the module docstring)."""
    accuracy = float(np.mean(ref_score))
    threshold = float(np.quantile(ref_confidence, 1.0 - accuracy))
    return {"method": "ATC", "estimate": float(np.mean(confidence > threshold)), "reference": accuracy,
            "threshold": threshold}


def doc(ref_confidence: np.ndarray, ref_score: np.ndarray, confidence: np.ndarray) -> dict:
    """DoC's estimate of the window's mean per-image score, clipped to [0, 1]."""
    reference = float(np.mean(ref_score))
    drop = float(np.mean(ref_confidence) - np.mean(confidence))
    return {"method": "DoC", "estimate": float(np.clip(reference - drop, 0.0, 1.0)), "reference": reference,
            "confidence_drop": drop}


def estimate(task: str, ref_confidence: np.ndarray, ref_score: np.ndarray, confidence: np.ndarray) -> dict:
    """The task's estimate: {method, metric, estimate, reference, and the method's own number}."""
    found = (atc if task == "classification" else doc)(ref_confidence, ref_score, confidence)
    return {"metric": METRICS[task], **found}
