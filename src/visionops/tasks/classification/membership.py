"""A classifier's membership signals: per-image cross-entropy and logit-scaled true-class confidence."""

from __future__ import annotations

import numpy as np
import torch
from scipy.special import log_softmax, logsumexp

from visionops.evaluation.membership import Signals
from visionops.tasks.classification import classifier


def signals(model: torch.nn.Module, device: torch.device, batch_size: int) -> Signals:
    """(loss, phi) of the served predictor (test-time augmentation and temperature, as an attacker
    querying it sees): loss = -log p_y, phi = log p_y - log(1 - p_y), computed from the logits so that
    a confidence that rounds to 1 keeps its rank."""

    def read(split, index: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        logits = classifier.predict_logits(model, np.asarray(split.images)[index], device, batch_size)
        logp = log_softmax(logits.double().numpy(), axis=1)
        y = np.asarray(split.labels, np.int64)[index]
        true = logp[np.arange(len(y)), y]
        others = logsumexp(np.where(np.eye(logp.shape[1], dtype=bool)[y], -np.inf, logp), axis=1)
        return -true, true - others

    return read
