"""The train/validation split, decided per document from its digest: re-running gives the
same split, and adding files later moves no document between splits (a document's side
depends on its own text and ``--seed`` only).

``--val-fraction F``: a document is validation when its split value, a uniform number in
[0, 1) mixed from its digest and the seed, is below F. ``--val-docs N``: validation is the N
distinct documents with the smallest split values (a first pass over the input finds the
threshold), stable on re-runs; with more files the N smallest can change, so a corpus that
grows should use ``--val-fraction``.

Identical documents have identical digests and land on the same side; deduplication then
keeps the first. Deduplication uses one table for both splits, so a paragraph kept in one
split is removed from every later document of either: no validation text in training.
"""
from __future__ import annotations

import numpy as np

_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)


def split_values(digests: np.ndarray, seed: int) -> np.ndarray:
    """A uniform float64 in [0, 1) per document (splitmix64 of the digest's second half and the seed)."""
    with np.errstate(over="ignore"):
        z = digests[:, 1] ^ (np.uint64(seed & 0xFFFFFFFFFFFFFFFF) * np.uint64(0x9E3779B97F4A7C15))
        z = (z ^ (z >> np.uint64(30))) * _M1
        z = (z ^ (z >> np.uint64(27))) * _M2
        z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(11)).astype(np.float64) / float(1 << 53)


class SmallestValues:
    """The N smallest distinct split values seen, for ``--val-docs N``; O(N) memory."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.values = np.zeros(0, np.float64)

    def add(self, values: np.ndarray) -> None:
        merged = np.unique(np.concatenate([self.values, values]))
        self.values = merged[: self.n]

    def threshold(self) -> float:
        """Validation is ``value <= threshold``; -1 when no value was seen."""
        return float(self.values[-1]) if self.values.size else -1.0
