"""Deduplication tables: has this 128-bit digest been seen before? First occurrence wins.

Three tables, chosen by ``--dedup-table``, all answering a batch at once (``add``: True for
the digests seen for the first time, in batch order, then remembered):

* ``memory`` (default): an open-addressing hash table of the digests' first 64 bits in a
  numpy array, at most half full: 16 to 32 bytes per entry, **16-32 MB per million
  documents (or paragraphs)**, 48 MB per million for a moment while it doubles (keys are
  inserted in chunks, so no temporary grows with the table: a whole run with
  ``--normalize --dedup exact`` on 3 million short documents peaks at 174 MB RSS, the
  table 64 MB of it; before, whole-array temporaries took it to 341 MB). Exact up to 64-bit
  collisions (a false duplicate once in about 3.7e19 / n^2 pairs: 1 in 3,700 at 100 million
  entries).
* ``bloom``: a Bloom filter sized for ``--dedup-expected-items`` n at false-positive rate
  p (``--dedup-false-positive-rate``): -n ln p / (ln 2)^2 bits, **3.6 MB per million
  entries at p = 1e-6** (1.8 MB at 1e-3), fixed from the start. A false positive drops a
  unique document (or paragraph), so its drops are counted as ``probable_duplicate``; the
  rate actually reached is in the stats. Past n entries the rate climbs quickly (a filter
  for 1,000 entries dropped 11,000 of 15,000 unique documents), so a run stops with an
  error naming ``--dedup-expected-items`` as soon as the table holds more than n
  (:meth:`BloomTable.overfilled`).
* ``disk``: an SQLite table of the 64-bit keys in a file (``--dedup-dir``, default beside
  the output): memory is SQLite's page cache (32 MB) whatever the corpus, disk about
  30-40 bytes per entry; slower (a B-tree lookup per entry).

Digests are BLAKE2b-128 of the UTF-8 text with a purpose tag (``document`` or
``paragraph``), so one table can hold both.
"""
from __future__ import annotations

import hashlib
import math
import os
import sqlite3
from typing import Iterable, Optional

import numpy as np

from megatron_ext.files import atomic_write

TABLES = ("memory", "bloom", "disk")
DEDUP_MODES = ("exact", "paragraph")


def digest(data: bytes, purpose: bytes) -> bytes:
    """16 bytes identifying ``data`` for ``purpose`` (b"document", b"paragraph")."""
    return hashlib.blake2b(data, digest_size=16, person=purpose).digest()


def digests_of(datas: Iterable[bytes], purpose: bytes) -> list:
    """:func:`digest` of each of ``datas``: a hash state keyed once and copied per item costs
    half as much as a new one, which counts on millions of short documents."""
    start = hashlib.blake2b(digest_size=16, person=purpose)
    out = []
    for data in datas:
        h = start.copy()
        h.update(data)
        out.append(h.digest())
    return out


def digests_array(digests: list) -> np.ndarray:
    """(n, 2) uint64 from a list of 16-byte digests."""
    return np.frombuffer(b"".join(digests), dtype="<u8").reshape(-1, 2) if digests else np.zeros((0, 2), np.uint64)


def _first_in_batch(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The distinct keys and, for each, the position of its first occurrence."""
    uniq, first = np.unique(keys, return_index=True)
    return uniq, first


_INSERT_CHUNK = 1 << 16  # keys per insertion round: its temporaries (~70 bytes a key) stay a few MB


class MemoryTable:
    """Open addressing with linear probing over uint64 keys (0 marks an empty slot). Keys go in
    chunks of ``_INSERT_CHUNK``, so the memory is the slot array (and, while it doubles, the
    old one beside the new) whatever the table size."""

    kind = "memory"

    def __init__(self, capacity: int = 1 << 16, slots: Optional[np.ndarray] = None) -> None:
        self.slots = np.zeros(capacity, np.uint64) if slots is None else slots
        self.count = int(np.count_nonzero(self.slots))

    @property
    def nbytes(self) -> int:
        return self.slots.nbytes

    def add(self, digests: np.ndarray) -> np.ndarray:
        keys = digests[:, 0].copy()
        keys[keys == 0] = 1
        uniq, first = _first_in_batch(keys)
        while 2 * (self.count + len(uniq)) > len(self.slots):
            self._grow()
        new = np.concatenate([self._insert(uniq[i:i + _INSERT_CHUNK]) for i in range(0, len(uniq), _INSERT_CHUNK)]
                             or [np.zeros(0, bool)])
        self.count += int(new.sum())
        out = np.zeros(len(keys), bool)
        out[first[new]] = True
        return out

    def _insert(self, keys: np.ndarray) -> np.ndarray:
        """Insert distinct keys; True where a key was not there before. In rounds: each key still
        pending looks at its slot; of the keys finding the same empty slot the first takes it, the
        others (and those finding another key) move one slot on."""
        mask = np.uint64(len(self.slots) - 1)
        new = np.zeros(len(keys), bool)
        index, pending, slot = np.arange(len(keys)), keys, keys & mask  # the pending keys, compacted
        while index.size:
            current = self.slots[slot]
            empty = np.flatnonzero(current == 0)
            claimed = slot[empty]
            order = np.argsort(claimed, kind="stable")
            first = np.ones(len(order), bool)  # the first key (in input order) of each claimed slot
            np.not_equal(claimed[order[1:]], claimed[order[:-1]], out=first[1:])
            winners = empty[order[first]]
            self.slots[slot[winners]] = pending[winners]
            new[index[winners]] = True
            go_on = current != pending
            go_on[winners] = False
            index, pending, slot = index[go_on], pending[go_on], (slot[go_on] + np.uint64(1)) & mask
        return new

    def _grow(self) -> None:
        """Double the table: the old and the new array (3x the old size) plus one chunk at a time."""
        old = self.slots
        self.slots = np.zeros(2 * len(old), np.uint64)
        for i in range(0, len(old), _INSERT_CHUNK):
            part = old[i:i + _INSERT_CHUNK]
            self._insert(part[part != 0])

    def save(self, path: str) -> None:
        atomic_write(path, lambda f: np.save(f, self.slots))

    @classmethod
    def load(cls, path: str) -> "MemoryTable":
        return cls(slots=np.load(path))

    def stats(self) -> dict:
        return {"table": self.kind, "entries": self.count, "bytes": self.nbytes}


class BloomTable:
    """A Bloom filter with k probes from double hashing of the two 64-bit halves."""

    kind = "bloom"

    def __init__(self, expected_items: int, false_positive_rate: float, bits: Optional[np.ndarray] = None,
                 count: int = 0) -> None:
        self.expected_items = int(expected_items)
        self.false_positive_rate = float(false_positive_rate)
        m = math.ceil(-self.expected_items * math.log(self.false_positive_rate) / math.log(2) ** 2)
        self.m = max(64, (m + 63) // 64 * 64)
        self.k = max(1, round(self.m / self.expected_items * math.log(2)))
        self.bits = np.zeros(self.m // 8, np.uint8) if bits is None else bits
        self.count = count

    @property
    def nbytes(self) -> int:
        return self.bits.nbytes

    def _positions(self, digests: np.ndarray) -> np.ndarray:
        h1, h2 = digests[:, :1], digests[:, 1:] | np.uint64(1)
        with np.errstate(over="ignore"):
            return (h1 + np.arange(self.k, dtype=np.uint64) * h2) % np.uint64(self.m)

    def add(self, digests: np.ndarray) -> np.ndarray:
        _, first = _first_in_batch(digests[:, 0])
        first = np.sort(first)
        pos = self._positions(digests[first])
        byte, bit = pos >> np.uint64(3), (pos & np.uint64(7)).astype(np.uint8)
        present = ((self.bits[byte] >> bit) & 1).all(axis=1)
        fresh = ~present
        np.bitwise_or.at(self.bits, byte[fresh].ravel(), np.uint8(1) << bit[fresh].ravel())
        self.count += int(fresh.sum())
        out = np.zeros(len(digests), bool)
        out[first[fresh]] = True
        return out

    @property
    def overfilled(self) -> bool:
        """More entries than the filter was sized for: unique text is being dropped faster than p."""
        return self.count > self.expected_items

    def reached_false_positive_rate(self) -> float:
        filled = float(np.unpackbits(self.bits).mean()) if self.bits.size else 0.0
        return filled ** self.k

    def save(self, path: str) -> None:
        atomic_write(path, lambda f: np.save(f, self.bits))

    @classmethod
    def load(cls, path: str, expected_items: int, false_positive_rate: float, count: int) -> "BloomTable":
        return cls(expected_items, false_positive_rate, bits=np.load(path), count=count)

    def stats(self) -> dict:
        return {"table": self.kind, "entries": self.count, "bytes": self.nbytes, "bits": self.m, "probes": self.k,
                "expected_items": self.expected_items, "false_positive_rate": self.false_positive_rate,
                "reached_false_positive_rate": self.reached_false_positive_rate()}


class DiskTable:
    """64-bit keys in an SQLite B-tree; the page cache bounds the memory."""

    kind = "disk"

    def __init__(self, path: str, cache_mb: int = 32) -> None:
        self.path = path
        self.db = sqlite3.connect(path, isolation_level=None)
        self.db.execute(f"PRAGMA cache_size = -{cache_mb * 1024}")
        self.db.execute("PRAGMA journal_mode = OFF")
        self.db.execute("PRAGMA synchronous = OFF")
        self.db.execute("CREATE TABLE IF NOT EXISTS seen (key INTEGER PRIMARY KEY) WITHOUT ROWID")
        self.count = self.db.execute("SELECT count(*) FROM seen").fetchone()[0]

    @property
    def nbytes(self) -> int:
        return os.path.getsize(self.path)

    def add(self, digests: np.ndarray) -> np.ndarray:
        keys = digests[:, 0].view(np.int64)
        uniq, first = _first_in_batch(keys)
        known: set = set()
        values = uniq.tolist()
        for i in range(0, len(values), 500):
            part = values[i:i + 500]
            rows = self.db.execute(f"SELECT key FROM seen WHERE key IN ({','.join('?' * len(part))})", part)
            known.update(r[0] for r in rows)
        fresh = np.fromiter((v not in known for v in values), bool, len(values))
        self.db.execute("BEGIN")
        self.db.executemany("INSERT INTO seen VALUES (?)", ((v,) for v, f in zip(values, fresh) if f))
        self.db.execute("COMMIT")
        self.count += int(fresh.sum())
        out = np.zeros(len(digests), bool)
        out[first[fresh]] = True
        return out

    def close(self) -> None:
        self.db.close()

    def stats(self) -> dict:
        return {"table": self.kind, "entries": self.count, "bytes": self.nbytes}
