"""Class-balance strategies: long-tail simulation, resampling, and loss-side weights or priors."""

from __future__ import annotations

import numpy as np


def class_counts(labels: np.ndarray, num_classes: int) -> np.ndarray:
    return np.bincount(labels, minlength=num_classes)


def simulate_long_tail(labels: np.ndarray, num_classes: int, factor: float, rng: np.random.Generator) -> np.ndarray:
    """Indices of a long-tailed subset: class c keeps n_max * factor**(-c / (C - 1)) images (CIFAR-10-LT)."""
    counts = class_counts(labels, num_classes)
    n_max = counts.max()
    keep = []
    for c in range(num_classes):
        target = int(n_max * factor ** (-c / max(num_classes - 1, 1)))
        members = rng.permutation(np.flatnonzero(labels == c))
        keep.append(members[: max(min(target, len(members)), min(1, len(members)))])
    return np.sort(np.concatenate(keep))


def resample(indices: np.ndarray, labels: np.ndarray, strategy: str, rng: np.random.Generator) -> np.ndarray:
    """Over- or undersample `indices` so every present class has the same count."""
    by_class = [indices[labels[indices] == c] for c in np.unique(labels[indices])]
    sizes = [len(m) for m in by_class]
    if strategy == "oversample":
        target = max(sizes)
        parts = [np.concatenate([m, rng.choice(m, target - len(m), replace=True)]) for m in by_class]
    elif strategy == "undersample":
        target = min(sizes)
        parts = [rng.choice(m, target, replace=False) for m in by_class]
    else:
        raise ValueError(f"resample: strategy must be 'oversample' or 'undersample', got {strategy!r}")
    return np.sort(np.concatenate(parts))


def class_weights(counts: np.ndarray) -> np.ndarray:
    """Inverse-frequency weights, N / (C * n_c), as scikit-learn's 'balanced'; 0 for absent classes."""
    counts = counts.astype(np.float64)
    present = counts > 0
    w = np.zeros_like(counts)
    w[present] = counts.sum() / (present.sum() * counts[present])
    return w


def class_priors(counts: np.ndarray) -> np.ndarray:
    """Empirical class priors for logit adjustment (Menon et al., 2021)."""
    return counts / counts.sum()
