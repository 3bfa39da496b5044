"""Confidence calibration: expected calibration error, reliability bins, temperature scaling.

Temperature scaling (Guo et al. 2017) divides the logits by one scalar T fitted on held-out
data by minimising the negative log-likelihood; it changes confidences, never the argmax.
"""

from __future__ import annotations

import numpy as np
from scipy.optimize import minimize_scalar
from scipy.special import log_softmax, softmax

LOG_T_BOUNDS = (np.log(1e-2), np.log(1e2))


def _numpy(x) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def probabilities(logits, temperature: float = 1.0) -> np.ndarray:
    """softmax(logits / T) in float64."""
    return softmax(_numpy(logits).astype(np.float64) / temperature, axis=1)


def nll(logits, labels, temperature: float = 1.0) -> float:
    """Mean negative log-likelihood of `labels` under softmax(logits / T)."""
    logits, labels = _numpy(logits).astype(np.float64), _numpy(labels).astype(np.int64)
    if len(labels) == 0:
        return float("nan")
    logp = log_softmax(logits / temperature, axis=1)
    return float(-logp[np.arange(len(labels)), labels].mean()) + 0.0  # no "-0.0"


def reliability_bins(probs, y, n_bins: int = 15) -> dict:
    """Equal-width confidence bins over [0, 1]: a sample with top-class confidence c falls in the
    bin (lo, hi] holding c (confidence 0 in the first bin).

    Returns edges (n_bins + 1), and per bin count, confidence (mean top probability) and accuracy
    (fraction whose argmax is right); confidence and accuracy are NaN in empty bins.
    """
    probs, y = _numpy(probs).astype(np.float64), _numpy(y).astype(np.int64)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    conf = probs.max(1) if len(probs) else np.empty(0)
    correct = (probs.argmax(1) == y).astype(np.float64) if len(probs) else np.empty(0)
    idx = np.clip(np.searchsorted(edges, conf, side="left") - 1, 0, n_bins - 1)
    count = np.bincount(idx, minlength=n_bins).astype(np.int64)
    conf_sum = np.bincount(idx, weights=conf, minlength=n_bins)
    acc_sum = np.bincount(idx, weights=correct, minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_conf = np.where(count > 0, conf_sum / np.maximum(count, 1), np.nan)
        mean_acc = np.where(count > 0, acc_sum / np.maximum(count, 1), np.nan)
    return {"edges": edges, "count": count, "confidence": mean_conf, "accuracy": mean_acc}


def expected_calibration_error(probs, y, n_bins: int = 15) -> float:
    """ECE = sum over bins of (bin size / N) * |accuracy(bin) - confidence(bin)|."""
    bins = reliability_bins(probs, y, n_bins)
    total = bins["count"].sum()
    if total == 0:
        return float("nan")
    filled = bins["count"] > 0
    gaps = np.abs(bins["accuracy"][filled] - bins["confidence"][filled])
    return float(np.sum(bins["count"][filled] / total * gaps))


def fit_temperature(val_logits, val_labels) -> float:
    """The T > 0 minimising the NLL of softmax(val_logits / T) on the validation labels.

    The NLL is convex in 1/T, so a bounded Brent search over log T (T in [0.01, 100]) finds the
    optimum; with no validation samples T = 1 (no change).
    """
    logits = _numpy(val_logits).astype(np.float64)
    labels = _numpy(val_labels).astype(np.int64)
    if len(labels) == 0:
        return 1.0
    rows = np.arange(len(labels))

    def objective(log_t: float) -> float:
        logp = log_softmax(logits * np.exp(-log_t), axis=1)
        return float(-logp[rows, labels].mean())

    res = minimize_scalar(objective, bounds=LOG_T_BOUNDS, method="bounded", options={"xatol": 1e-5})
    return float(np.exp(res.x))
