"""Splits that never move: each image's part is a seeded hash of its content, not a permutation.

An image's position u in [0, 1) is blake2b(f"{seed}:{content_hash}") read as a 53-bit fraction.
The parts take consecutive intervals of [0, 1), in the order given and each as wide as its
fraction; the rest of [0, 1) is train. Hence:

- adding or removing other images never moves an image: its u depends on its pixels alone;
- exact duplicates share a content hash, so they share a part (no train/test leakage);
- a part's membership depends only on the seed and on its own and the earlier parts' fractions
  (the first part, the holdout, on its own fraction alone).

Stratification is statistical, not exact: among a class's n distinct images, the number in a part
of fraction f is Binomial(n, f), so the realised fraction is within about 2 * sqrt(f(1-f)/n) of f
(+-0.06 for f = 0.2 and n = 180; it shrinks as classes grow).

Edge case: a class with images but none hashed into train gets its image with the largest u (the
nearest to train) moved to train, with its duplicates, so that it keeps a training example. That
happens with probability F**n for n distinct images and parts of total fraction F (1% at
F = 0.4, n = 5), and it is the one case where adding images can move one: once an added image of
that class lands in train, the moved image returns to its hashed part.
"""

from __future__ import annotations

import hashlib

import numpy as np

BITS = 53  # exactly representable as a float64 fraction


def position(content_hash: str, seed: int) -> float:
    """The image's seeded, uniform position in [0, 1)."""
    digest = hashlib.blake2b(f"{seed}:{content_hash}".encode(), digest_size=8).digest()
    return (int.from_bytes(digest, "big") >> (64 - BITS)) / 2**BITS


def hash_split(
    labels: np.ndarray, hashes: list[str], fractions: dict[str, float], seed: int
) -> dict[str, np.ndarray]:
    """Sorted indices per part: one per entry of `fractions` (in order), then "train" with the rest.

    Raises ValueError when the fractions leave no room for train.
    """
    total = sum(fractions.values())
    if total >= 1.0:
        raise ValueError(f"split fractions {fractions} sum to {total:g}; they must leave room for train (< 1)")
    labels = np.asarray(labels)
    u = np.array([position(h, seed) for h in hashes], dtype=np.float64)
    names = [*fractions, "train"]
    bounds = np.cumsum([fractions[n] for n in fractions])
    part = np.searchsorted(bounds, u, side="right")  # index into `names`; len(fractions) is train
    train = len(fractions)
    for cls in np.unique(labels):
        members = np.flatnonzero(labels == cls)
        if not np.any(part[members] == train):
            nearest = members[np.argmax(u[members])]
            part[u == u[nearest]] = train  # the image and its exact duplicates
    return {name: np.flatnonzero(part == i) for i, name in enumerate(names)}
