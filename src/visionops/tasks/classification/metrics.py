"""Classification metrics of a model's scores on a labelled split (scikit-learn under the hood)."""

from __future__ import annotations

import warnings

import numpy as np
from sklearn import metrics as skm


def _numpy(x) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def top_k_accuracy(y_true, scores, k: int) -> tuple[int, float]:
    """(k actually used, fraction of samples whose label is among the k highest scores).

    k is capped at the number of classes; k >= n_classes is a perfect score by definition
    (scikit-learn would warn), so it is returned without asking scikit-learn.
    """
    y_true, scores = _numpy(y_true).astype(np.int64), _numpy(scores)
    n_classes = scores.shape[1]
    k = max(1, min(int(k), n_classes))
    if len(y_true) == 0:
        return k, float("nan")
    if k >= n_classes:
        return k, 1.0
    if n_classes == 2:  # sklearn's binary case wants the positive-class score only; k is 1 here
        return k, float(np.mean(scores.argmax(1) == y_true))
    return k, float(skm.top_k_accuracy_score(y_true, scores, k=k, labels=np.arange(n_classes)))


def classification_metrics(y_true, logits_or_probs, class_names: list[str], top_k: int = 5) -> dict:
    """Headline and per-class metrics from scores (logits or probabilities; only their order matters).

    Returns {n, accuracy, balanced_accuracy, macro_f1, top_k, top_k_accuracy, per_class}, where
    per_class maps each class name to {precision, recall, f1, support, accuracy}; a class's accuracy
    is the fraction of its images classified correctly (its recall), None when it has no images.
    """
    y_true = _numpy(y_true).astype(np.int64)
    scores = _numpy(logits_or_probs)
    n_classes = len(class_names)
    if scores.ndim != 2 or scores.shape[1] != n_classes:
        raise ValueError(f"scores have shape {scores.shape}, expected (N, {n_classes})")
    if len(y_true) != len(scores):
        raise ValueError(f"{len(y_true)} labels but {len(scores)} score rows")
    labels = np.arange(n_classes)
    y_pred = scores.argmax(1)
    k, topk = top_k_accuracy(y_true, scores, top_k)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "y_pred contains classes not in y_true" and friends
        precision, recall, f1, support = skm.precision_recall_fscore_support(
            y_true, y_pred, labels=labels, zero_division=0
        )
        balanced = float(skm.balanced_accuracy_score(y_true, y_pred)) if len(y_true) else float("nan")
    per_class = {
        name: {
            "precision": float(precision[i]),
            "recall": float(recall[i]),
            "f1": float(f1[i]),
            "support": int(support[i]),
            "accuracy": float(recall[i]) if support[i] else None,
        }
        for i, name in enumerate(class_names)
    }
    return {
        "n": len(y_true),
        "accuracy": float(skm.accuracy_score(y_true, y_pred)) if len(y_true) else float("nan"),
        "balanced_accuracy": balanced,
        "macro_f1": float(np.mean(f1)),
        "top_k": k,
        "top_k_accuracy": topk,
        "per_class": per_class,
    }


def confusion(y_true, y_pred, n: int) -> np.ndarray:
    """n x n counts: row = true class, column = predicted class."""
    return skm.confusion_matrix(_numpy(y_true), _numpy(y_pred), labels=np.arange(n))
