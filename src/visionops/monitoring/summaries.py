"""A log row's summaries: of the image the network saw and of the answer, per task.

Everything here is vectorised over a request's rows and reads only what serving computed anyway: the
canonical images and the output frame of the task's served model.
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd

def _mean_var(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per row of a float32 N x D array: (mean, variance), in two passes (a sum and a dot product)."""
    mean = rows.mean(1)
    return mean, np.maximum(np.einsum("ij,ij->i", rows, rows) / rows.shape[1] - mean * mean, 0)


def image_summary(images: np.ndarray) -> dict[str, np.ndarray]:
    """Per canonical uint8 N x H x W x C image: brightness (mean / 255), contrast (standard deviation / 255)
    and blur (variance of the 3x3 Laplacian of the channel mean, in 0..1 units; low means blurred)."""
    n, c = len(images), images.shape[-1]
    x = np.asarray(images).reshape(n, -1).astype(np.float32)
    mean, var = _mean_var(x)
    grey = x.reshape(images.shape) @ np.ones(c, np.float32)  # c times the channel mean (a sum over the last axis is slow)
    lap = grey[:, :-2, 1:-1] + grey[:, 2:, 1:-1] + grey[:, 1:-1, :-2] + grey[:, 1:-1, 2:] - 4 * grey[:, 1:-1, 1:-1]
    _, blur = _mean_var(lap.reshape(n, -1))
    return {"brightness": mean / 255, "contrast": np.sqrt(var) / 255, "blur": blur / (255 * c) ** 2}


def classification_answers(frame: pd.DataFrame, class_names: list[str]) -> dict[str, list]:
    """The label, its probability, 1, and the probability vector (frame: the classifier's `output_columns`)."""
    from visionops.serving.pyfunc import PROB_PREFIX

    probs = np.stack([frame[PROB_PREFIX + c].to_numpy(np.float32) for c in class_names], 1)
    return {"answer_class": frame["label"].tolist(), "confidence": frame["probability"].to_numpy(np.float32),
            "answer_count": [1] * len(frame), "answer_shares": list(probs)}


def detection_answers(frame: pd.DataFrame, class_names: list[str]) -> dict[str, list]:
    """The top-scoring box's class, the mean box score, the box count and the share of boxes per class
    (frame: the detector's `detections` JSON); a row without boxes has no class, no score and zero shares."""
    out = {"answer_class": [], "confidence": [], "answer_count": [], "answer_shares": []}
    index = {c: i for i, c in enumerate(class_names)}
    for text in frame["detections"]:
        d = json.loads(text)
        scores, labels = np.asarray(d["scores"], np.float32), d["labels"]
        shares = np.bincount([index[c] for c in labels], minlength=len(class_names)).astype(np.float32)
        out["answer_class"].append(labels[int(scores.argmax())] if len(labels) else None)
        out["confidence"].append(float(scores.mean()) if len(labels) else None)
        out["answer_count"].append(len(labels))
        out["answer_shares"].append(shares / max(len(labels), 1))
    return out


def segmentation_answers(frame: pd.DataFrame, class_names: list[str], confidence: np.ndarray) -> dict[str, list]:
    """The largest class other than the background (class 0; the background when nothing else is present),
    the mean pixel top probability (`confidence`, one per row, from the logits), the classes present and the
    share of pixels per class (frame: the segmenter's PNG `mask` at the input's size)."""
    from visionops.tasks.segmentation.serving import decode_mask

    out = {"answer_class": [], "confidence": list(confidence), "answer_count": [], "answer_shares": []}
    for text in frame["mask"]:
        counts = np.bincount(decode_mask(text).ravel(), minlength=len(class_names))[: len(class_names)]
        shares = (counts / max(counts.sum(), 1)).astype(np.float32)
        top = int(counts[1:].argmax()) + 1 if len(counts) > 1 and counts[1:].any() else 0
        out["answer_class"].append(class_names[top])
        out["answer_count"].append(int((counts > 0).sum()))
        out["answer_shares"].append(shares)
    return out
