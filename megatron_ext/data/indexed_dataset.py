"""Megatron's MMapIndexedDataset format (.bin/.idx): reader, checker and builder.

Layout of ``<prefix>.idx`` (little-endian), as written by megatron-core 0.16.1::

    b"MMIDIDX\\x00\\x00" | u64 version = 1 | u8 dtype code | u64 N sequences |
    u64 D document-index entries | i32 lengths[N] | i64 byte pointers[N] | i64 document index[D]

``<prefix>.bin`` holds the tokens of every sequence back to back. The document index
starts at 0 and ends at N; document ``k`` is sequences ``[index[k], index[k+1])``.

:class:`IndexedDataset` maps both files and hands out zero-copy views. Opening runs
the O(1) checks (header, counts against the .idx size, .bin size against the last
pointer and length); :meth:`IndexedDataset.verify` runs the full O(N) check.
:class:`IndexedDatasetBuilder` drives the native streaming writer. Neither needs torch
or megatron-core.
"""
from __future__ import annotations

import mmap
import os
import struct
from dataclasses import dataclass
from typing import Union

import numpy as np

PathLike = Union[str, "os.PathLike[str]"]

INDEX_HEADER = b"MMIDIDX\x00\x00"
INDEX_VERSION = 1
_HEADER = struct.Struct("<9sQBQQ")  # magic, version, dtype code, sequences, document indices
HEADER_BYTES = _HEADER.size  # 34

# Megatron's dtype codes (megatron.core.datasets.indexed_dataset.DType).
DTYPE_CODES = {
    1: np.uint8,
    2: np.int8,
    3: np.int16,
    4: np.int32,
    5: np.int64,
    6: np.float64,
    7: np.float32,
    8: np.uint16,
}
_CODE_OF = {np.dtype(t): c for c, t in DTYPE_CODES.items()}
_VERIFY_CHUNK = 1 << 22


class IndexedDatasetError(ValueError):
    """A .bin/.idx pair that breaks the format; the message names the file."""


def data_file_path(path_prefix: PathLike) -> str:
    return os.fspath(path_prefix) + ".bin"


def index_file_path(path_prefix: PathLike) -> str:
    return os.fspath(path_prefix) + ".idx"


def dtype_for_vocab(vocab_size: int | None) -> type:
    """Token dtype for a vocabulary, by megatron-core's rule: uint16 below 65,500, else int32."""
    if vocab_size is not None and vocab_size < 65500:
        return np.uint16
    return np.int32


def dtype_code(dtype) -> int:
    """Megatron's code for a numpy dtype (``np.uint16`` -> 8)."""
    try:
        return _CODE_OF[np.dtype(dtype)]
    except (KeyError, TypeError):
        raise ValueError(f"dtype {dtype!r} has no code in the .idx format") from None


def _map(path: str) -> mmap.mmap | bytes:
    with open(path, "rb") as f:
        if os.fstat(f.fileno()).st_size == 0:
            return b""
        return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)


class IndexedDataset:
    """Read-only view of ``<path_prefix>.bin`` / ``<path_prefix>.idx``.

    ``dataset[i]`` / ``dataset.get(i, offset, length)`` return numpy views into the
    memory-mapped .bin (no copy). ``dtype`` is the numpy scalar type (``np.uint16``...),
    as in megatron-core.
    """

    def __init__(self, path_prefix: PathLike) -> None:
        self.path_prefix = os.fspath(path_prefix)
        self.idx_path = index_file_path(self.path_prefix)
        self.bin_path = data_file_path(self.path_prefix)
        self._open()

    # -- opening and checks ----------------------------------------------------------

    def _fail(self, message: str, path: str | None = None) -> None:
        raise IndexedDatasetError(f"{path or self.idx_path}: {message}")

    def _open(self) -> None:
        idx_path = self.idx_path
        idx_size = os.stat(idx_path).st_size  # FileNotFoundError names the file
        bin_size = os.stat(self.bin_path).st_size
        if idx_size < HEADER_BYTES:
            self._fail(f"{idx_size} bytes is too short for the {HEADER_BYTES}-byte header")
        self._idx = _map(idx_path)
        magic, version, code, n, d = _HEADER.unpack_from(self._idx, 0)
        if magic != INDEX_HEADER:
            self._fail(f"bad magic {magic!r} (expected {INDEX_HEADER!r})")
        if version != INDEX_VERSION:
            self._fail(f"unsupported version {version} (expected {INDEX_VERSION})")
        if code not in DTYPE_CODES:
            self._fail(f"unknown dtype code {code}")
        expected = HEADER_BYTES + 12 * n + 8 * d
        if expected != idx_size:
            self._fail(
                f"size {idx_size} bytes does not match its header ({n} sequences, {d} document "
                f"indices need {expected} bytes)"
            )
        if d == 0:
            self._fail("the document index is empty (it must start with 0)")
        self.dtype = DTYPE_CODES[code]
        self.dtype_code = code
        self._itemsize = np.dtype(self.dtype).itemsize
        self.sequence_lengths = np.frombuffer(self._idx, np.int32, n, HEADER_BYTES)
        self.sequence_pointers = np.frombuffer(self._idx, np.int64, n, HEADER_BYTES + 4 * n)
        self.document_indices = np.frombuffer(self._idx, np.int64, d, HEADER_BYTES + 12 * n)

        if self.document_indices[0] != 0:
            self._fail(f"the document index starts at {self.document_indices[0]}, not 0")
        if self.document_indices[-1] != n:
            self._fail(f"the document index ends at {self.document_indices[-1]} but there are {n} sequences")
        if n > 0:
            if self.sequence_pointers[0] != 0:
                self._fail(f"sequence 0 points at byte {self.sequence_pointers[0]}, not 0")
            last_len = int(self.sequence_lengths[-1])
            if last_len < 0:
                self._fail(f"sequence {n - 1} has negative length {last_len}")
            last_pointer = int(self.sequence_pointers[-1])
            if last_pointer < 0 or last_pointer % self._itemsize:
                self._fail(f"sequence {n - 1} points at byte {last_pointer}, not a token boundary")
            data_bytes = last_pointer + last_len * self._itemsize
        else:
            data_bytes = 0
        if bin_size != data_bytes:
            kind = "truncated" if bin_size < data_bytes else "longer than its index"
            self._fail(
                f"size {bin_size} bytes does not match its index {self.idx_path} "
                f"({data_bytes} bytes of tokens): {kind}, or the two files come from different runs",
                self.bin_path,
            )
        self._bin = _map(self.bin_path)
        self._tokens = np.frombuffer(self._bin, self.dtype)

    def verify(self) -> None:
        """Full O(N) consistency check; raises :class:`IndexedDatasetError` at the first problem.

        Checks that no length is negative, that every pointer starts where the previous
        sequence ends (the .bin is one contiguous run, so offsets cannot drift), and that
        the document index is non-decreasing from 0 to N.
        """
        lengths, pointers, n = self.sequence_lengths, self.sequence_pointers, len(self)
        end = 0  # byte where the previous chunk ended
        for start in range(0, n, _VERIFY_CHUNK):
            lens = lengths[start : start + _VERIFY_CHUNK].astype(np.int64)
            bad = np.flatnonzero(lens < 0)
            if bad.size:
                i = start + int(bad[0])
                self._fail(f"sequence {i} has negative length {lengths[i]}")
            expected = np.empty_like(lens)
            expected[0] = end
            np.cumsum(lens[:-1] * self._itemsize, out=expected[1:])
            expected[1:] += end
            bad = np.flatnonzero(pointers[start : start + lens.size] != expected)
            if bad.size:
                i = start + int(bad[0])
                self._fail(
                    f"sequence {i} points at byte {pointers[i]} but the sequences before it end at "
                    f"byte {expected[bad[0]]} (offset error)"
                )
            end = int(expected[-1]) + int(lens[-1]) * self._itemsize
        if end != len(self._bin):
            self._fail(f"the sequences cover {end} bytes but the file has {len(self._bin)}", self.bin_path)
        docs = self.document_indices
        previous = 0
        for start in range(0, docs.size, _VERIFY_CHUNK):
            chunk = docs[start : start + _VERIFY_CHUNK]
            steps = np.diff(chunk, prepend=previous)
            bad = np.flatnonzero(steps < 0)
            if bad.size:
                k = start + int(bad[0])
                self._fail(f"document index entry {k} is {docs[k]}, below the previous entry {docs[k - 1]}")
            previous = int(chunk[-1])

    # -- access --------------------------------------------------------------------

    def __len__(self) -> int:
        return self.sequence_lengths.shape[0]

    @property
    def sequence_count(self) -> int:
        return len(self)

    @property
    def document_count(self) -> int:
        """Number of documents (one less than the document index entries)."""
        return self.document_indices.shape[0] - 1

    @property
    def token_count(self) -> int:
        return self._tokens.shape[0]

    def _index(self, idx) -> int:
        if not isinstance(idx, (int, np.integer)) or isinstance(idx, (bool, np.bool_)):
            raise TypeError(f"sequence index must be an integer, got {type(idx).__name__}")
        n = len(self)
        i = int(idx)
        if not -n <= i < n:
            raise IndexError(f"{self.path_prefix}: sequence index {i} out of range for {n} sequences")
        return i + n if i < 0 else i

    def _span(self, i: int, offset: int, length: int) -> np.ndarray:
        pointer = int(self.sequence_pointers[i])
        if pointer % self._itemsize:
            self._fail(f"sequence {i} points at byte {pointer}, not a multiple of the {self._itemsize}-byte dtype")
        start = pointer // self._itemsize + offset
        if start + length > self._tokens.shape[0]:
            self._fail(f"sequence {i} ends past the end of {self.bin_path} (offset error)")
        return self._tokens[start : start + length]

    def __getitem__(self, idx):
        """Sequence ``idx`` (negative counts from the end), or a list for a contiguous slice."""
        if isinstance(idx, slice):
            start, stop, step = idx.indices(len(self))
            if step != 1:
                raise ValueError("slices of an IndexedDataset must be contiguous (step 1)")
            return [self._span(i, 0, int(self.sequence_lengths[i])) for i in range(start, stop)]
        i = self._index(idx)
        return self._span(i, 0, int(self.sequence_lengths[i]))

    def get(self, idx: int, offset: int = 0, length: int | None = None) -> np.ndarray:
        """Tokens ``[offset, offset + length)`` of sequence ``idx`` (to its end when length is None)."""
        i = self._index(idx)
        size = int(self.sequence_lengths[i])
        offset = int(offset)
        if not 0 <= offset <= size:
            raise ValueError(f"{self.path_prefix}: offset {offset} out of range for sequence {i} of length {size}")
        if length is None:
            length = size - offset
        length = int(length)
        if length < 0 or offset + length > size:
            raise ValueError(
                f"{self.path_prefix}: offset {offset} + length {length} out of range for sequence {i} of "
                f"length {size}"
            )
        return self._span(i, offset, length)

    def document(self, k: int) -> np.ndarray:
        """All tokens of document ``k`` (its sequences are contiguous in the .bin)."""
        d = self.document_count
        if not -d <= k < d:
            raise IndexError(f"{self.path_prefix}: document index {k} out of range for {d} documents")
        k = k + d if k < 0 else k
        first, last = int(self.document_indices[k]), int(self.document_indices[k + 1])
        if first == last:
            return self._tokens[:0]
        start = int(self.sequence_pointers[first]) // self._itemsize
        stop = int(self.sequence_pointers[last - 1]) // self._itemsize + int(self.sequence_lengths[last - 1])
        return self._tokens[start:stop]

    @staticmethod
    def exists(path_prefix: PathLike) -> bool:
        return os.path.exists(index_file_path(path_prefix)) and os.path.exists(data_file_path(path_prefix))

    def __getstate__(self) -> str:
        return self.path_prefix

    def __setstate__(self, path_prefix: str) -> None:
        self.__init__(path_prefix)

    def __repr__(self) -> str:
        return (
            f"IndexedDataset({self.path_prefix!r}, dtype={np.dtype(self.dtype).name}, "
            f"sequences={len(self)}, documents={self.document_count})"
        )


# -- checking ---------------------------------------------------------------------------


@dataclass(frozen=True)
class DatasetStats:
    path_prefix: str
    dtype: str
    documents: int
    sequences: int
    tokens: int
    p50: int
    p90: int
    p99: int
    max: int

    def row(self) -> str:
        """A markdown table row (see :data:`STATS_HEADER`)."""
        return (
            f"| {self.path_prefix} | {self.dtype} | {self.documents} | {self.sequences} | {self.tokens} "
            f"| {self.p50} | {self.p90} | {self.p99} | {self.max} |"
        )


STATS_HEADER = (
    "| prefix | dtype | documents | sequences | tokens | p50 len | p90 len | p99 len | max len |\n"
    "|---|---|---|---|---|---|---|---|---|"
)


def check_dataset(path_prefix: PathLike) -> DatasetStats:
    """Open and fully verify a dataset, returning its statistics.

    Raises :class:`IndexedDatasetError` naming the file and the first inconsistency,
    or ``FileNotFoundError`` for a missing file.
    """
    ds = IndexedDataset(path_prefix)
    ds.verify()
    lengths = ds.sequence_lengths
    if lengths.size:
        p50, p90, p99 = (int(v) for v in np.percentile(lengths, [50, 90, 99], method="nearest"))
        longest = int(lengths.max())
    else:
        p50 = p90 = p99 = longest = 0
    return DatasetStats(
        path_prefix=ds.path_prefix,
        dtype=np.dtype(ds.dtype).name,
        documents=ds.document_count,
        sequences=len(ds),
        tokens=ds.token_count,
        p50=p50,
        p90=p90,
        p99=p99,
        max=longest,
    )


# -- building ---------------------------------------------------------------------------


class IndexedDatasetBuilder:
    """Writes a dataset byte-identical to megatron-core's ``IndexedDatasetBuilder``.

    Same methods as megatron-core (``add_item``, ``add_document``, ``end_document``,
    ``add_index``, ``finalize``); tokens may be numpy arrays of any integer dtype (read
    without a copy), lists, or anything ``numpy.asarray`` accepts, and are converted to
    ``dtype`` with a range check. Memory use does not grow with the dataset. Nothing
    appears at ``bin_path`` or the index path before :meth:`finalize`; dropping the
    builder (or :meth:`discard`) removes its temporaries. ``durable=True`` also fsyncs
    the files and their directory around the final renames.
    """

    def __init__(self, bin_path: PathLike, dtype=np.int32, *, durable: bool = False) -> None:
        from megatron_ext import _native

        self.dtype = DTYPE_CODES[dtype_code(dtype)]
        self._builder = _native.IndexedDatasetBuilder(os.fspath(bin_path), dtype_code(dtype), durable)
        # The per-document calls run millions of times: they go straight to native functions
        # bound to this builder (positional arguments only), skipping the Python wrappers
        # below, which document them.
        self.add_item, self.add_document, self.end_document = self._builder.fast_calls()

    def add_item(self, tokens) -> None:
        """Append one sequence."""
        self._builder.add_item(tokens)

    def add_document(self, tokens, lengths) -> None:
        """Append one document of ``len(lengths)`` sequences (the lengths sum to ``len(tokens)``)."""
        self._builder.add_document(tokens, lengths)

    def end_document(self) -> None:
        """Close the document made of the sequences added since the previous one."""
        self._builder.end_document()

    def add_index(self, path_prefix: PathLike) -> None:
        """Append a whole dataset of the same dtype (its .bin copied, its index shifted)."""
        try:
            self._builder.add_index(os.fspath(path_prefix))
        except ValueError as e:
            raise IndexedDatasetError(str(e)) from None

    def finalize(self, idx_path: PathLike) -> None:
        """Write the index and move ``.bin`` then ``.idx`` into place."""
        self._builder.finalize(os.fspath(idx_path))

    def discard(self) -> None:
        """Remove the temporaries without writing anything."""
        self._builder.discard()

    @property
    def sequence_count(self) -> int:
        return self._builder.sequence_count

    @property
    def document_count(self) -> int:
        return self._builder.document_count

    @property
    def token_count(self) -> int:
        return self._builder.token_count

    def __enter__(self) -> "IndexedDatasetBuilder":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        """Leaving the block without finalize (or on an exception) discards the output."""
        self._builder.discard()


# -- merging ----------------------------------------------------------------------------


def find_dataset_prefixes(directory: PathLike) -> list[str]:
    """Sorted prefixes of the .bin/.idx pairs in ``directory``; a lone half is an error."""
    directory = os.fspath(directory)
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"{directory}: not a directory")
    names = set(os.listdir(directory))
    prefixes = set()
    for name in names:
        stem, ext = os.path.splitext(name)
        if ext not in (".bin", ".idx") or not os.path.isfile(os.path.join(directory, name)):
            continue
        other = stem + (".idx" if ext == ".bin" else ".bin")
        if other not in names:
            raise IndexedDatasetError(f"{os.path.join(directory, name)}: no matching {other} in {directory}")
        prefixes.add(stem)
    return [os.path.join(directory, p) for p in sorted(prefixes)]


def merge_datasets(prefixes: list[PathLike], output_prefix: PathLike, *, durable: bool = False) -> None:
    """Concatenate ``prefixes`` (in order) into ``output_prefix`` with ``add_index``.

    Every input is opened and checked first, so a missing or broken input, or mixed
    dtypes, raise (naming the files) before anything is written.
    """
    prefixes = [os.fspath(p) for p in prefixes]
    output_prefix = os.fspath(output_prefix)
    if not prefixes:
        raise ValueError("nothing to merge: no .bin/.idx pairs given")
    out = os.path.abspath(output_prefix)
    dtype = first = None
    for prefix in prefixes:
        if os.path.abspath(prefix) == out:
            raise ValueError(f"{index_file_path(prefix)}: the output prefix is also an input")
        ds = IndexedDataset(prefix)
        if dtype is None:
            dtype, first = ds.dtype, prefix
        elif ds.dtype != dtype:
            raise IndexedDatasetError(
                f"{index_file_path(prefix)}: dtype {ds.dtype.__name__} differs from "
                f"{index_file_path(first)} ({dtype.__name__}); refusing to merge mixed dtypes"
            )
        del ds
    with IndexedDatasetBuilder(data_file_path(output_prefix), dtype=dtype, durable=durable) as builder:
        for prefix in prefixes:
            builder.add_index(prefix)
        builder.finalize(index_file_path(output_prefix))
