"""Exact and near-duplicate images, grouped by union-find.

BUSI holds the same image more than once, sometimes in two class folders. Two relations:

- **exact**: the same SHA-256 of the *decoded* 8-bit greyscale pixels and size (so a PNG
  re-encoded with other settings still matches; byte-identical files always do);
- **near**: a 16 x 16 difference hash (256 bits: is each pixel of a 17 x 16 box-filtered
  greyscale thumbnail brighter than its left neighbour) within :data:`NEAR_THRESHOLD` bits.
  On busi-dev every pair at <= 37 bits is one picture saved twice (rescaled, re-encoded, with
  or without calipers), the closest pair of distinct captures is at 56 and unrelated images
  start at about 72; the threshold sits in that gap.

Groups are the transitive closure of both relations.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Iterable

import numpy as np
from PIL import Image

__all__ = ["HASH_SIDE", "NEAR_THRESHOLD", "Duplicates", "difference_hash", "find_duplicates", "pixel_hash"]

NEAR_THRESHOLD = 46
"""Largest Hamming distance (of 256 bits) at which two images count as near-duplicates."""
HASH_SIDE = 16
_POPCOUNT = np.array([bin(i).count("1") for i in range(256)], dtype=np.uint16)


def pixel_hash(grey: np.ndarray) -> str:
    """SHA-256 of a decoded (H, W) uint8 image, its size included."""
    digest = hashlib.sha256(f"{grey.shape[0]}x{grey.shape[1]}:".encode())
    digest.update(np.ascontiguousarray(grey, dtype=np.uint8).tobytes())
    return digest.hexdigest()


def difference_hash(grey: np.ndarray, side: int = HASH_SIDE) -> np.ndarray:
    """``side * side`` bits, packed to uint8: is each thumbnail pixel brighter than its left one.

    The thumbnail is the (H, W) uint8 image box-filtered (area-averaged) to ``side + 1`` x
    ``side`` pixels, which makes the hash insensitive to size, re-encoding and small marks.
    """
    thumb = Image.fromarray(grey).resize((side + 1, side), Image.Resampling.BOX)
    values = np.asarray(thumb, dtype=np.int16)
    return np.packbits(values[:, 1:] > values[:, :-1])


@dataclass(frozen=True)
class Duplicates:
    """Duplicate structure of a dataset.

    Attributes:
        groups: every image's group as lists of dataset indices (singletons included), each
            sorted, ordered by first member.
        exact: groups of size > 1 of identical decoded pixels (indices).
        near: (i, j, distance) for every pair with a hash distance <= threshold, i < j.
        threshold: the Hamming threshold used.
    """

    groups: list[list[int]]
    exact: list[list[int]]
    near: list[tuple[int, int, int]]
    threshold: int


def find_duplicates(greys: Iterable[np.ndarray], *, threshold: int = NEAR_THRESHOLD) -> Duplicates:
    """Group images that are exact or near duplicates (union-find over both relations).

    Args:
        greys: (H, W) uint8 images, in dataset order.
        threshold: largest Hamming distance of the 256-bit difference hashes that counts as
            near-duplicate; a negative value switches near-duplicate detection off.

    Example:
        >>> rng = np.random.default_rng(0)
        >>> a, b = (rng.integers(0, 256, (40, 50), dtype=np.uint8) for _ in range(2))
        >>> brighter = (a // 2 + 10).astype(np.uint8)  # same structure, other levels
        >>> find_duplicates([a, b, a.copy(), brighter]).groups
        [[0, 2, 3], [1]]
    """
    by_hash: dict[str, list[int]] = {}
    codes = []
    for index, grey in enumerate(greys):
        by_hash.setdefault(pixel_hash(grey), []).append(index)
        codes.append(difference_hash(grey))
    count = len(codes)
    parent = list(range(count))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    def union(i: int, j: int) -> None:
        a, b = find(i), find(j)
        if a != b:
            parent[max(a, b)] = min(a, b)

    exact = sorted(sorted(v) for v in by_hash.values() if len(v) > 1)
    for members in exact:
        for other in members[1:]:
            union(members[0], other)
    near: list[tuple[int, int, int]] = []
    if count > 1 and threshold >= 0:
        packed = np.stack(codes)  # (n, 32) uint8
        for i in range(count - 1):  # one row at a time keeps memory at O(n)
            distances = _POPCOUNT[packed[i] ^ packed[i + 1:]].sum(axis=1)
            for offset in np.flatnonzero(distances <= threshold):
                j = i + 1 + int(offset)
                near.append((i, j, int(distances[offset])))
                union(i, j)
    members_of: dict[int, list[int]] = {}
    for i in range(count):
        members_of.setdefault(find(i), []).append(i)
    groups = sorted(members_of.values())
    return Duplicates(groups=groups, exact=exact, near=near, threshold=threshold)
