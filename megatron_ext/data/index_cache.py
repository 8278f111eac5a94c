"""On-disk cache of dataset index arrays (``--data-cache-path``).

An entry is a set of ``.npy`` arrays plus a description JSON, all named
``<key>-<kind>-...`` in one directory::

    3f2a...-GPTDataset-train-document_index.npy
    3f2a...-GPTDataset-train-sample_index.npy
    3f2a...-GPTDataset-train-shuffle_index.npy
    3f2a...-GPTDataset-train-description.json

The key is a hash of a description of everything that changes the arrays' content
(see :func:`cache_key`); the JSON holds that description and, per array, its dtype,
shape and CRC-32. Every file is written atomically (``megatron_ext.files``: a hidden
temporary in the same directory, renamed into place) with the permissions of an
ordinary new file, so other users of a shared cache can read it; the JSON goes last,
so an entry whose JSON is present names all of its arrays. A reader accepts an entry
only when the JSON parses, describes the same content, and every array matches its
dtype, shape and checksum; anything else (missing, partial, corrupt) is a miss.

Concurrency: there are no locks and nobody waits. Every process (rank, node) that
misses builds the arrays itself — they are deterministic — and writes them; several
writers replace the same names with identical bytes, and a reader sees either an old
complete file or a new complete one. A reader that meets a mix it cannot verify just
builds its own copy.
"""
from __future__ import annotations

import hashlib
import json
import os
import zlib
from typing import Callable, Mapping, Optional, Sequence, Tuple

import numpy as np
from megatron_ext.errors import MegatronExtError
from megatron_ext.files import atomic_write, atomic_write_text

FORMAT_VERSION = 1
_CRC_CHUNK = 1 << 26


class IndexCacheError(MegatronExtError, OSError):
    """The cache directory cannot be written (the message names it)."""

    exit_code = 1


def cache_key(description: Mapping) -> str:
    """Hex digest naming an entry: SHA-256 of the canonical JSON of ``description``."""
    text = json.dumps(description, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:32]


def lengths_digest(values: np.ndarray) -> str:
    """SHA-1 of an int32 array, e.g. an .idx file's sequence lengths (all a sample index
    depends on) or a split's sequence ids."""
    data = np.ascontiguousarray(values, dtype=np.int32)
    return hashlib.sha1(memoryview(data).cast("B"), usedforsecurity=False).hexdigest()


def _crc32(array: np.ndarray) -> int:
    view = memoryview(np.ascontiguousarray(array)).cast("B")
    crc = 0
    for start in range(0, len(view), _CRC_CHUNK):
        crc = zlib.crc32(view[start:start + _CRC_CHUNK], crc)
    return crc


class IndexCache:
    """A cache directory, or ``None`` for no caching (every lookup misses, nothing is written).

    ``verify``: check each array's CRC-32 on load (a full read); with ``False`` only the
    description, dtypes, shapes and file sizes are checked.
    """

    def __init__(self, directory: Optional[str], verify: bool = True) -> None:
        self.directory = os.fspath(directory) if directory is not None else None
        self.verify = verify

    @property
    def enabled(self) -> bool:
        return self.directory is not None

    def _path(self, key: str, kind: str, suffix: str) -> str:
        return os.path.join(self.directory, f"{key}-{kind}-{suffix}")

    def description_path(self, key: str, kind: str) -> str:
        return self._path(key, kind, "description.json")

    def array_path(self, key: str, kind: str, name: str) -> str:
        return self._path(key, kind, f"{name}.npy")

    def load(self, key: str, kind: str, description: Mapping,
             names: Sequence[str]) -> Optional[dict]:
        """The arrays of a complete, verified entry (memory-mapped), or ``None``."""
        if not self.enabled:
            return None
        try:
            with open(self.description_path(key, kind), "r", encoding="utf-8") as f:
                meta = json.load(f)
        except (OSError, ValueError):
            return None
        if (not isinstance(meta, dict) or meta.get("format_version") != FORMAT_VERSION
                or meta.get("key") != key or meta.get("description") != json.loads(json.dumps(description))):
            return None
        entries = meta.get("arrays")
        if not isinstance(entries, dict) or set(entries) != set(names):
            return None
        arrays = {}
        for name in names:
            entry = entries[name]
            try:
                array = np.load(self.array_path(key, kind, name), mmap_mode="r", allow_pickle=False)
            except (OSError, ValueError, EOFError):
                return None
            if (not isinstance(entry, dict) or str(array.dtype) != entry.get("dtype")
                    or list(array.shape) != entry.get("shape")):
                return None
            if self.verify and _crc32(array) != entry.get("crc32"):
                return None
            arrays[name] = array
        return arrays

    def load_or_build(self, key: str, kind: str, description: Mapping, names: Sequence[str],
                      build: Callable[[], Sequence[np.ndarray]]) -> Tuple[dict, bool]:
        """``(arrays by name, hit)``: a complete, verified entry, or ``build()``'s arrays (in the
        order of ``names``), stored for the next run."""
        arrays = self.load(key, kind, description, names)
        if arrays is not None:
            return arrays, True
        arrays = dict(zip(names, build()))
        self.store(key, kind, description, arrays)
        return arrays, False

    def store(self, key: str, kind: str, description: Mapping, arrays: Mapping[str, np.ndarray]) -> None:
        """Write every array, then the description JSON, each atomically."""
        if not self.enabled:
            return
        try:
            os.makedirs(self.directory, exist_ok=True)
            entries = {}
            for name, array in arrays.items():
                array = np.ascontiguousarray(array)
                atomic_write(self.array_path(key, kind, name),
                             lambda f, a=array: np.save(f, a, allow_pickle=False))
                entries[name] = {"file": os.path.basename(self.array_path(key, kind, name)),
                                 "dtype": str(array.dtype), "shape": list(array.shape),
                                 "crc32": _crc32(array)}
            meta = {"format_version": FORMAT_VERSION, "key": key, "kind": kind,
                    "description": description, "arrays": entries}
            atomic_write_text(self.description_path(key, kind), json.dumps(meta, indent=2, sort_keys=True))
        except OSError as e:
            raise IndexCacheError(
                f"cannot write the dataset index cache in {self.directory} (--data-cache-path): {e}"
            ) from e
