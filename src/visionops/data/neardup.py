"""Near-duplicate groups: images whose perceptual hashes lie within a Hamming distance, linked transitively.

`download` hashes each source file's decoded image at source resolution (`perceptual_hash`, imagehash's pHash
or dHash: 64 bits, stored as 16 hex digits) and splits by group (`group_identities`): a group's identity is the
smallest identity among its earliest members (an imported image is later: `data.imports`), so every member of
a group lands in the same part, and an imported copy joins its group without moving it. Images the source
generates (digits, cifar10, canvases) get no perceptual hash: their groups are their exact duplicates.
"""

from __future__ import annotations

import numpy as np
from PIL import Image
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from visionops.data.images import to_8bit

HASHES = ("phash", "dhash", "none")
BLOCK = 128  # rows of the Hamming matrix computed at a time (BLOCK x n uint64: 41 MB at n = 40k)


def perceptual_hash(img: Image.Image, kind: str) -> str:
    """The 64-bit `kind` hash of `img` (16-bit greyscale rescaled first) as 16 hex digits; "" for "none"."""
    if kind == "none":
        return ""
    import imagehash

    bits = getattr(imagehash, kind)(to_8bit(img)).hash.ravel()
    return np.packbits(bits).tobytes().hex()


def pack(hashes: list[str]) -> np.ndarray:
    """uint64 per 16-hex-digit hash (0 where there is none; `has_hash` tells which)."""
    return np.array([int(h, 16) if h else 0 for h in hashes], dtype=np.uint64)


def pairs(hashes: list[str], max_distance: int) -> tuple[np.ndarray, np.ndarray]:
    """(i, j) with i < j of every two hashed images within `max_distance` bits, vectorised a block at a time."""
    has = np.flatnonzero([bool(h) for h in hashes])
    packed = pack([hashes[k] for k in has])
    rows, cols = [], []
    for start in range(0, len(packed), BLOCK):
        block = packed[start : start + BLOCK]
        near = np.bitwise_count(block[:, None] ^ packed[None, start:]) <= max_distance
        i, j = np.nonzero(np.triu(near, 1))  # the later images only: each pair once
        rows.append(i + start)
        cols.append(j + start)
    i = np.concatenate(rows) if rows else np.zeros(0, np.int64)
    j = np.concatenate(cols) if cols else np.zeros(0, np.int64)
    return has[i], has[j]


def components(identities: list[str], hashes: list[str], max_distance: int) -> np.ndarray:
    """A component index per image: exact duplicates (equal identities) and near duplicates linked transitively."""
    n = len(identities)
    _, first = np.unique(identities, return_inverse=True)  # exact duplicates: one node per identity
    i, j = pairs(hashes, max_distance) if hashes else (np.zeros(0, np.int64), np.zeros(0, np.int64))
    rows, cols = np.concatenate([np.arange(n), i]), np.concatenate([n + first, j])
    graph = coo_matrix((np.ones(len(rows), np.int8), (rows, cols)), shape=(2 * n, 2 * n))
    _, label = connected_components(graph, directed=False)
    return np.unique(label[:n], return_inverse=True)[1]


def group_identities(identities: list[str], hashes: list[str], max_distance: int,
                     ranks: list[str] | None = None) -> list[str]:
    """Each image's group identity: the smallest identity of its group (`components`), among its members of the
    smallest rank when `ranks` are given (the time an image was imported, "" before any: `data.imports`), so
    that an image added later joins a group without renaming it."""
    comp = components(identities, hashes, max_distance)
    ranks = ranks or [""] * len(identities)
    order = sorted(range(len(identities)), key=lambda k: (ranks[k], identities[k]))
    smallest: dict[int, str] = {}
    for k in order:
        smallest.setdefault(int(comp[k]), identities[k])
    return [smallest[int(c)] for c in comp]
