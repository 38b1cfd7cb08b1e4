"""DCT perceptual hash (pHash) and a Hamming-radius index for near-duplicate search."""

from __future__ import annotations

from collections import defaultdict

import numpy as np
from PIL import Image
from scipy.fft import dctn

HASH_BITS = 64


def phash(img: Image.Image) -> str:
    """64-bit pHash as 16 hex digits: signs of the 8x8 lowest DCT frequencies of a 32x32 gray.

    Resizing and re-encoding change high frequencies only, so copies land a few bits apart.
    """
    gray = np.asarray(img.convert("L").resize((32, 32), Image.Resampling.BOX), dtype=np.float64)
    low = dctn(gray, type=2, norm="ortho")[:8, :8].ravel()
    # The DC term is the mean brightness; leaving it out of the median keeps the split balanced.
    bits = low > np.median(low[1:])
    return f"{int(''.join('1' if b else '0' for b in bits), 2):016x}"


def bit_blocks(n: int) -> list[tuple[int, int]]:
    """``n`` disjoint (lo, hi) bit ranges covering the 64 bits as evenly as possible."""
    edges = np.linspace(0, HASH_BITS, max(n, 1) + 1).astype(int)
    return [(int(lo), int(hi)) for lo, hi in zip(edges[:-1], edges[1:]) if hi > lo]


def hamming(a: str, b: str) -> int:
    return (int(a, 16) ^ int(b, 16)).bit_count()


class NearDuplicateIndex:
    """Finds a stored hash within ``max_distance`` bits without comparing against every hash.

    Pigeonhole: two 64-bit hashes at distance <= d agree exactly on at least one of d+1
    disjoint bit bands, so only hashes sharing a band value are compared.
    """

    def __init__(self, max_distance: int) -> None:
        self.max_distance = max_distance
        self._bands = bit_blocks(max_distance + 1)
        self._buckets: list[dict[int, list[tuple[int, str]]]] = [defaultdict(list) for _ in self._bands]

    def _keys(self, value: int) -> list[int]:
        return [(value >> lo) & ((1 << (hi - lo)) - 1) for lo, hi in self._bands]

    def find(self, h: str) -> tuple[str, int] | None:
        """(label of the closest stored hash, distance), or None when nothing is within range."""
        if self.max_distance < 0:
            return None
        value = int(h, 16)
        best: tuple[str, int] | None = None
        for bucket, key in zip(self._buckets, self._keys(value)):
            for other, label in bucket.get(key, ()):
                d = (value ^ other).bit_count()
                if d <= self.max_distance and (best is None or d < best[1]):
                    best = (label, d)
        return best

    def add(self, h: str, label: str) -> None:
        value = int(h, 16)
        for bucket, key in zip(self._buckets, self._keys(value)):
            bucket[key].append((value, label))
