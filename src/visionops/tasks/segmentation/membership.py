"""A segmenter's membership signals: per-image pixel cross-entropy and mean true-class pixel probability."""

from __future__ import annotations

import numpy as np
import torch

from visionops.evaluation.membership import Signals, logit
from visionops.tasks.segmentation import segmenter


def signals(model: torch.nn.Module, device: torch.device | str, batch_size: int) -> Signals:
    """(loss, phi) per image over its labelled pixels (not `segmenter.IGNORE`): loss = the mean pixel
    cross-entropy (the criterion's main term), phi = logit of the mean true-class pixel probability."""

    def read(split, index: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        loss, phi = np.empty(len(index)), np.empty(len(index))
        for start in range(0, len(index), batch_size):
            chunk = index[start : start + batch_size]
            logp = segmenter.predict_logits(model, np.asarray(split.images)[chunk], device, batch_size).double().log_softmax(1)
            masks = torch.from_numpy(np.asarray(split.targets["masks"])[chunk].astype(np.int64))
            keep = (masks != segmenter.IGNORE).double()
            true = logp.gather(1, masks.clamp_max(logp.shape[1] - 1)[:, None])[:, 0]
            pixels = keep.sum((1, 2)).clamp_min(1)
            loss[start : start + len(chunk)] = (-(true * keep).sum((1, 2)) / pixels).numpy()
            phi[start : start + len(chunk)] = logit(((true.exp() * keep).sum((1, 2)) / pixels).numpy())
        return loss, phi

    return read
