"""Splits that never move: each image's part is a seeded hash of its identity, not a permutation.

An image's identity is a digest of what the source holds, before any setting touches it: the file's
bytes (folder, coco, voc, yolo, masks), the source's own pixels at source resolution (digits, cifar10)
or the generated canvas pixels (canvases); see `Split.identities`. A source of files hashes its group's
identity instead: the smallest identity among the images linked to it by perceptual hashes within
data.near_duplicate_max_distance bits, transitively (`visionops.data.neardup`; data.near_duplicate_hash
"none" links exact copies only), so that near duplicates share a part. Its position u in [0, 1) is
blake2b(f"{seed}:{identity}") read as a 53-bit fraction. The parts take consecutive intervals of
[0, 1), in the order given and each as wide as its fraction; the rest of [0, 1) is train. An image's
part is therefore a function of its (group's) identity, the seed and the fractions, and of nothing else:

- adding or removing other images never moves an image, nor does changing data.image_size or
  data.channels (the identity, and the perceptual hash, are taken before resizing and colour conversion);
- exact duplicates (the same file bytes, or the same source pixels) and near-duplicate groups share a part;
- a part's membership depends only on the seed and on its own and the earlier parts' fractions
  (the first part, the holdout, on its own fraction alone).

The limit of near-duplicate groups: an added image moves images already placed exactly when it joins
their group with an identity smaller than the group's smallest (the group is renamed after it), or when
it links two or more groups (a bridge: every group but the one of the smallest identity is renamed);
removing an image can likewise rename a group or split it. A renamed group moves, all of it, when its
new identity hashes into another part: with probability 1 - sum(f**2) over the parts' fractions f, train's
included (0.58 at the defaults 0.1, 0.1, 0.2, train 0.6). Images in no group with an added one never
move, and changing data.near_duplicate_* regroups. Generated sources are not perceptually hashed.

No image is ever moved to fill a class: a class whose every image hashed outside train has no train
image, and validate fails naming it until images of it are added (detection and segmentation, whose
class is an image's dominant one, warn of a class without train instances). For n distinct images and
parts of total fraction F that happens with probability F**n (1% at F = 0.4, n = 5). So an image that
was in train never enters the holdout, val or test while the seed and fractions (and, for a source of
files, its group) stay.

Stratification is statistical, not exact: among a class's n distinct images, the number in a part
of fraction f is Binomial(n, f), so the realised fraction is within about 2 * sqrt(f(1-f)/n) of f
(+-0.06 for f = 0.2 and n = 180; it shrinks as classes grow).
"""

from __future__ import annotations

import hashlib

import numpy as np

BITS = 53  # exactly representable as a float64 fraction


def position(identity: str, seed: int) -> float:
    """The image's seeded, uniform position in [0, 1)."""
    digest = hashlib.blake2b(f"{seed}:{identity}".encode(), digest_size=8).digest()
    return (int.from_bytes(digest, "big") >> (64 - BITS)) / 2**BITS


def hash_split(identities: list[str], fractions: dict[str, float], seed: int) -> dict[str, np.ndarray]:
    """Sorted indices per part: one per entry of `fractions` (in order), then "train" with the rest.

    Raises ValueError when the fractions leave no room for train.
    """
    total = sum(fractions.values())
    if total >= 1.0:
        raise ValueError(f"split fractions {fractions} sum to {total:g}; they must leave room for train (< 1)")
    u = np.array([position(h, seed) for h in identities], dtype=np.float64)
    bounds = np.cumsum([fractions[n] for n in fractions])
    part = np.searchsorted(bounds, u, side="right")  # index into [*fractions, "train"]
    return {name: np.flatnonzero(part == i) for i, name in enumerate([*fractions, "train"])}
