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

Beside the two files our builder writes ``<prefix>.manifest.json`` (:class:`DatasetManifest`):
counts, the smallest and largest token id, and the CRC-32 of the .bin and of the .idx.
Megatron's files stay byte-identical; the manifest is what lets a checker tell an .idx
and a .bin of different runs, or a .bin changed in place, from the real thing, and gives
the largest token id without reading the .bin. For a dataset written by another tool the
same manifest is computed by one pass over the files (``origin: "scan"``) and cached.

Entry points for a trainer, cheap enough to call on every dataset at start:
:func:`verify_dataset` (the consistency checks of ``tools/check_dataset.py``) and
:func:`check_token_range` (every token id inside the model's vocabulary).

Temporaries (``<prefix>.bin.tmp-*``, ``.idx.tmp-*``, ``.manifest.json.tmp-*`` and work
directories ``.<name>-<purpose>.tmp-*``) are locked with flock(2) by the process writing
them; :func:`remove_stale_temporaries` removes those whose writer is gone.
"""
from __future__ import annotations

import fcntl
import json
import mmap
import os
import secrets
import shutil
import struct
import time
import zlib
from dataclasses import asdict, dataclass, field
from typing import Optional, Union

import numpy as np
from megatron_ext.errors import InputError
from megatron_ext.files import replace_with_temporary

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


class IndexedDatasetError(InputError):
    """A .bin/.idx pair that breaks the format; the message names the file."""


class TokenRangeError(IndexedDatasetError):
    """A token id outside the vocabulary; the message names the .bin, the id and where it is."""


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


# -- manifest -----------------------------------------------------------------------------

MANIFEST_SUFFIX = ".manifest.json"
MANIFEST_FORMAT = "megatron_ext indexed dataset manifest"
MANIFEST_VERSION = 1
TEMP_MARK = ".tmp-"
_SCAN_CHUNK = 1 << 26  # bytes per step of a .bin scan


def manifest_file_path(path_prefix: PathLike) -> str:
    return os.fspath(path_prefix) + MANIFEST_SUFFIX


@dataclass(frozen=True)
class DatasetManifest:
    """What was written: ``origin`` is ``"builder"`` (recorded by the writer, with the data)
    or ``"scan"`` (computed later from the files; it shows changes since the scan only).
    The token ids are None for a dataset without tokens; checksums are zlib's CRC-32."""


    origin: str
    dtype: str
    documents: int
    sequences: int
    tokens: int
    bin_bytes: int
    idx_bytes: int
    bin_crc32: int
    idx_crc32: int
    min_token_id: Optional[int]
    max_token_id: Optional[int]
    bin_ends_crc32: int  # CRC-32 of the first and last MiB of the .bin: a cheap check of its content

    def to_json(self) -> str:
        return json.dumps({"format": MANIFEST_FORMAT, "version": MANIFEST_VERSION, **asdict(self)}, indent=1) + "\n"


def read_manifest(path_prefix: PathLike) -> Optional[DatasetManifest]:
    """The manifest beside a dataset, None when there is none; a corrupt one is an error."""
    path = manifest_file_path(path_prefix)
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        return None
    try:
        data = json.loads(raw)
        if data.pop("format") != MANIFEST_FORMAT or data.pop("version") != MANIFEST_VERSION:
            raise ValueError("unknown format or version")
        return DatasetManifest(**data)
    except (ValueError, TypeError, KeyError, AttributeError) as e:
        raise IndexedDatasetError(f"{path}: not a readable dataset manifest ({e}); remove it to check without") from None


def _create_locked(stem: str) -> tuple[int, str]:
    """A new ``<stem>.tmp-<random>`` file, flock'ed (see the native builder)."""
    for _ in range(64):
        name = f"{stem}{TEMP_MARK}{secrets.token_hex(8)}"
        try:
            fd = os.open(name, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666)
        except FileExistsError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:  # a cleaner got it first
            os.close(fd)
            continue
        except OSError:
            pass  # no flock on this file system: unlocked, as the native builder does
        if os.fstat(fd).st_nlink == 0:
            os.close(fd)
            continue
        return fd, name
    raise FileExistsError(f"{stem}: cannot create a temporary file next to it")


def _write_file_atomic(path: str, data: bytes, durable: bool = False) -> None:
    fd, tmp = _create_locked(path)
    try:
        replace_with_temporary(fd, tmp, path, lambda f: f.write(data), durable=durable)
    finally:
        os.close(fd)


def write_manifest(path_prefix: PathLike, manifest: DatasetManifest, *, durable: bool = False) -> None:
    """Write ``<prefix>.manifest.json`` atomically."""
    _write_file_atomic(manifest_file_path(path_prefix), manifest.to_json().encode(), durable)


_ENDS_BYTES = 1 << 20


def ends_crc32(path: PathLike) -> int:
    """CRC-32 of a file's first and last MiB (the whole file when it is smaller than 2 MiB)."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size <= 2 * _ENDS_BYTES:
            return zlib.crc32(f.read())
        crc = zlib.crc32(f.read(_ENDS_BYTES))
        f.seek(size - _ENDS_BYTES)
        return zlib.crc32(f.read(_ENDS_BYTES), crc)


def file_crc32(path: PathLike) -> int:
    """zlib's CRC-32 of a whole file, read in large blocks."""
    crc = 0
    with open(path, "rb") as f:
        while block := f.read(_SCAN_CHUNK):
            crc = zlib.crc32(block, crc)
    return crc


def scan_dataset(ds: "IndexedDataset") -> DatasetManifest:
    """A manifest computed by one pass over the .bin (checksum, smallest and largest id)."""
    crc, lo, hi = 0, None, None
    view = memoryview(ds._bin) if len(ds._bin) else memoryview(b"")
    step = _SCAN_CHUNK - _SCAN_CHUNK % ds._itemsize
    for start in range(0, len(view), step):
        block = view[start : start + step]
        crc = zlib.crc32(block, crc)
        tokens = np.frombuffer(block, ds.dtype)
        if tokens.size:
            mn, mx = int(tokens.min()), int(tokens.max())
            lo = mn if lo is None else min(lo, mn)
            hi = mx if hi is None else max(hi, mx)
    return DatasetManifest(
        origin="scan", dtype=np.dtype(ds.dtype).name, documents=ds.document_count, sequences=len(ds),
        tokens=ds.token_count, bin_bytes=len(ds._bin), idx_bytes=len(ds._idx), bin_crc32=crc,
        idx_crc32=file_crc32(ds.idx_path), min_token_id=lo, max_token_id=hi, bin_ends_crc32=ends_crc32(ds.bin_path),
    )


def _different_files(path: str, what: str, actual, recorded, manifest_path: str) -> IndexedDatasetError:
    return IndexedDatasetError(
        f"{path}: {what} is {actual} but {manifest_path} records {recorded}: the .idx and .bin are not "
        f"the files the manifest was written for (from different runs, or changed since; if another "
        f"tool rewrote the dataset on purpose, remove the manifest)"
    )


def check_manifest(ds: "IndexedDataset", manifest: DatasetManifest, *, deep: bool = False) -> None:
    """Compare a dataset with its manifest: counts, sizes, the .idx checksum and that of
    the first and last MiB of the .bin (cheap); with ``deep`` also the whole .bin's
    checksum and token range (one pass over the .bin)."""
    mpath = manifest_file_path(ds.path_prefix)
    quick = [
        (ds.idx_path, "dtype", np.dtype(ds.dtype).name, manifest.dtype),
        (ds.idx_path, "the document count", ds.document_count, manifest.documents),
        (ds.idx_path, "the sequence count", len(ds), manifest.sequences),
        (ds.bin_path, "the token count", ds.token_count, manifest.tokens),
        (ds.bin_path, "the size in bytes", len(ds._bin), manifest.bin_bytes),
        (ds.idx_path, "the size in bytes", len(ds._idx), manifest.idx_bytes),
    ]
    for path, what, actual, recorded in quick:
        if actual != recorded:
            raise _different_files(path, what, actual, recorded, mpath)
    crc = file_crc32(ds.idx_path)
    if crc != manifest.idx_crc32:
        raise _different_files(ds.idx_path, "the CRC-32", f"{crc:08x}", f"{manifest.idx_crc32:08x}", mpath)
    crc = ends_crc32(ds.bin_path)
    if crc != manifest.bin_ends_crc32:
        raise _different_files(ds.bin_path, "the CRC-32 of its first and last MiB", f"{crc:08x}",
                               f"{manifest.bin_ends_crc32:08x}", mpath)
    if deep:
        scanned = scan_dataset(ds)
        if scanned.bin_crc32 != manifest.bin_crc32:
            raise _different_files(ds.bin_path, "the CRC-32", f"{scanned.bin_crc32:08x}",
                                   f"{manifest.bin_crc32:08x}", mpath)
        got = (scanned.min_token_id, scanned.max_token_id)
        want = (manifest.min_token_id, manifest.max_token_id)
        if got != want:
            raise _different_files(ds.bin_path, "the token id range", got, want, mpath)


def verify_dataset(path_prefix: PathLike) -> "IndexedDataset":
    """The consistency checks of ``tools/check_dataset.py``, cheap enough for every run's start.

    Opens the dataset (header, counts, sizes), runs :meth:`IndexedDataset.verify` (every
    pointer against the lengths before it: offset errors) and, when a manifest is present,
    compares counts, sizes and the .idx checksum with it. Costs one pass over the .idx,
    none over the .bin. Raises :class:`IndexedDatasetError` (a ``ValueError``) naming the
    file and the first inconsistency, with the same message as the checker; returns the
    opened dataset.
    """
    ds = IndexedDataset(path_prefix)
    ds.verify()
    manifest = read_manifest(ds.path_prefix)
    if manifest is not None:
        check_manifest(ds, manifest)
    return ds


def token_range(path_prefix: PathLike, *, cache: bool = True) -> Optional[tuple[int, int]]:
    """(smallest, largest) token id of a dataset, None when it has no tokens.

    Read from the manifest when it matches the files; otherwise computed by one pass over
    the .bin and, with ``cache``, kept as a ``"scan"`` manifest beside the dataset (skipped
    silently where the directory is read-only), so the next call is cheap.
    """
    ds = IndexedDataset(path_prefix)
    manifest = read_manifest(ds.path_prefix)
    if manifest is not None:
        check_manifest(ds, manifest)
    else:
        manifest = scan_dataset(ds)
        if cache:
            try:
                write_manifest(ds.path_prefix, manifest)
            except OSError:
                pass
    if manifest.max_token_id is None:
        return None
    return manifest.min_token_id, manifest.max_token_id


def _first_outside(ds: "IndexedDataset", vocab_size: int) -> tuple[int, int]:
    """(token position, id) of the first token outside [0, vocab_size)."""
    tokens = ds._tokens
    for start in range(0, tokens.shape[0], _VERIFY_CHUNK):
        chunk = tokens[start : start + _VERIFY_CHUNK]
        bad = np.flatnonzero((chunk < 0) | (chunk >= vocab_size))
        if bad.size:
            return start + int(bad[0]), int(chunk[bad[0]])
    raise AssertionError("no token outside the vocabulary")


def check_token_range(path_prefix: PathLike, vocab_size: int, *, cache: bool = True) -> Optional[int]:
    """Refuse a dataset with a token id outside ``[0, vocab_size)``; return its largest id.

    Cheap for datasets our builder wrote (the largest id is in the manifest); one pass over
    the .bin otherwise, cached (see :func:`token_range`). Raises :class:`TokenRangeError`
    naming the .bin, the offending id, and the document, sequence and position of its first
    occurrence. Returns None for a dataset without tokens.
    """
    vocab_size = int(vocab_size)
    if vocab_size < 1:
        raise ValueError(f"vocabulary size must be positive, got {vocab_size}")
    span = token_range(path_prefix, cache=cache)
    if span is None:
        return None
    lo, hi = span
    if lo >= 0 and hi < vocab_size:
        return hi
    ds = IndexedDataset(path_prefix)
    position, value = _first_outside(ds, vocab_size)
    starts = ds.sequence_pointers // ds._itemsize
    seq = int(np.searchsorted(starts, position, side="right")) - 1
    while seq > 0 and ds.sequence_lengths[seq] == 0:  # zero-length sequences share a start
        seq -= 1
    doc = int(np.searchsorted(ds.document_indices, seq, side="right")) - 1
    raise TokenRangeError(
        f"{ds.bin_path}: token id {value} is outside the vocabulary of {vocab_size} (ids 0..{vocab_size - 1}) "
        f"at document {doc}, sequence {seq}, token {position - int(starts[seq])}; the dataset's ids span "
        f"{lo}..{hi}: it was tokenized with another tokenizer than the model's"
    )


# -- temporaries ----------------------------------------------------------------------------


_LOCK_NAME = ".lock"
_UNLOCKED_GRACE_S = 600  # a work directory without its lock file yet is left alone this long


def _temporary_candidates(path_prefix: str) -> list[str]:
    directory = os.path.dirname(os.path.abspath(path_prefix))
    base = os.path.basename(path_prefix)
    own = tuple(base + ext + TEMP_MARK for ext in (".bin", ".idx", MANIFEST_SUFFIX))
    try:
        names = os.listdir(directory)
    except OSError:
        return []
    out = []
    for name in names:
        if name.startswith(own):
            out.append(os.path.join(directory, name))
        elif name.startswith(".") and TEMP_MARK in name and os.path.isdir(os.path.join(directory, name)):
            # a work directory ".<stem>-<purpose>.tmp-*" of an output prefix <stem>, whose
            # datasets are <stem> or <stem>_<key>_document
            stem = name[1:].rsplit(TEMP_MARK, 1)[0].rsplit("-", 1)[0]
            if stem and (base == stem or base.startswith(stem + "_")):
                out.append(os.path.join(directory, name))
    return sorted(out)


def _try_lock(path: str) -> Optional[int]:
    """An fd holding the exclusive lock of ``path``, or None when a live process holds it."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return None
    return fd


def find_temporaries(path_prefix: PathLike) -> tuple[list[str], list[str]]:
    """(stale, live) temporaries of a dataset prefix (see :func:`remove_stale_temporaries`)."""
    stale, live = [], []
    for path in _temporary_candidates(os.fspath(path_prefix)):
        lock_path = os.path.join(path, _LOCK_NAME) if os.path.isdir(path) else path
        fd = _try_lock(lock_path)
        if fd is None and os.path.isdir(path) and not os.path.exists(lock_path):
            try:
                young = time.time() - os.stat(path).st_mtime < _UNLOCKED_GRACE_S
            except FileNotFoundError:
                continue
            (live if young else stale).append(path)
            continue
        if fd is None:
            live.append(path)
        else:
            os.close(fd)
            stale.append(path)
    return stale, live


def remove_stale_temporaries(path_prefix: PathLike) -> list[str]:
    """Remove the temporaries of ``path_prefix`` that no live process is writing.

    Those are files ``<prefix>.bin.tmp-*``, ``<prefix>.idx.tmp-*``,
    ``<prefix>.manifest.json.tmp-*`` and work directories ``.<stem>-<purpose>.tmp-*`` of
    an output prefix ``<stem>`` (of which ``<prefix>`` is ``<stem>`` or
    ``<stem>_<key>_document``), left by a killed run. The writer of a temporary holds an
    exclusive flock on it (on a work directory's ``.lock``) while it is alive; a temporary
    is removed only while this call holds that lock, so a live run's files are never
    touched. Returns the removed paths.
    """
    removed = []
    for path in _temporary_candidates(os.fspath(path_prefix)):
        is_dir = os.path.isdir(path)
        lock_path = os.path.join(path, _LOCK_NAME) if is_dir else path
        fd = _try_lock(lock_path)
        if fd is None:
            if not (is_dir and not os.path.exists(lock_path)):
                continue
            try:
                if time.time() - os.stat(path).st_mtime < _UNLOCKED_GRACE_S:
                    continue
            except FileNotFoundError:
                continue
        try:
            if is_dir:
                shutil.rmtree(path, ignore_errors=True)
            elif fd is not None and os.path.exists(path) and os.stat(path).st_ino == os.fstat(fd).st_ino:
                os.unlink(path)
            else:
                continue
            removed.append(path)
        except OSError:
            pass
        finally:
            if fd is not None:
                os.close(fd)
    return removed


class WorkDirectory:
    """A hidden scratch directory beside an output, ``.<stem>-<purpose>.tmp-<random>``,
    locked while this object lives, so that :func:`remove_stale_temporaries` of a later
    run removes it only once its writer is gone. :meth:`close` removes it."""

    def __init__(self, output_prefix: PathLike, purpose: str) -> None:
        output_prefix = os.fspath(output_prefix)
        directory = os.path.dirname(os.path.abspath(output_prefix))
        stem = os.path.basename(output_prefix)
        self.path = os.path.join(directory, f".{stem}-{purpose}{TEMP_MARK}{secrets.token_hex(8)}")
        os.mkdir(self.path)
        try:
            self._fd = os.open(os.path.join(self.path, _LOCK_NAME), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
            try:
                fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise
            except OSError:
                pass  # no flock here: the directory is protected by its age only
        except BaseException:
            shutil.rmtree(self.path, ignore_errors=True)
            raise

    def close(self) -> None:
        if self._fd is not None:
            shutil.rmtree(self.path, ignore_errors=True)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "WorkDirectory":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


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
    max_token_id: Optional[int] = None  # None: unknown (no manifest and no scan) or no tokens
    notes: tuple = field(default=(), compare=False)  # what was not checked, and why

    def row(self) -> str:
        """A markdown table row (see :data:`STATS_HEADER`)."""
        top = "n/a" if self.max_token_id is None else self.max_token_id
        return (
            f"| {self.path_prefix} | {self.dtype} | {self.documents} | {self.sequences} | {self.tokens} "
            f"| {self.p50} | {self.p90} | {self.p99} | {self.max} | {top} |"
        )


STATS_HEADER = (
    "| prefix | dtype | documents | sequences | tokens | p50 len | p90 len | p99 len | max len | max id |\n"
    "|---|---|---|---|---|---|---|---|---|---|"
)


def check_dataset(path_prefix: PathLike, *, vocab_size: Optional[int] = None, deep: bool = False,
                  cache: bool = True) -> DatasetStats:
    """Open and fully verify a dataset, returning its statistics.

    Runs :func:`verify_dataset`; with ``deep`` also recomputes the .bin checksum and the
    token range against the manifest (or, without one, computes them); with
    ``vocab_size`` also :func:`check_token_range`. ``notes`` says what could not be
    checked. Raises :class:`IndexedDatasetError` naming the file and the first
    inconsistency (:class:`TokenRangeError` for an id outside the vocabulary), or
    ``FileNotFoundError`` for a missing file.
    """
    ds = verify_dataset(path_prefix)
    mpath = manifest_file_path(ds.path_prefix)
    manifest = read_manifest(ds.path_prefix)
    notes = []
    if manifest is None:
        notes.append(
            f"no manifest {mpath} (the dataset was written by another tool): could not check that the .idx "
            f"and .bin come from the same run, nor that the .bin is unchanged"
            + ("" if deep or vocab_size is not None else ", nor its largest token id (--deep or --vocab-size)")
        )
    else:
        if manifest.origin != "builder":
            notes.append(f"{mpath} was computed by a scan of existing files, not by their writer: "
                         f"it shows changes since that scan only")
        if deep:
            check_manifest(ds, manifest, deep=True)
        else:
            notes.append(f"{ds.bin_path}: only its first and last MiB were re-read (--deep checks all of it)")
    top = manifest.max_token_id if manifest is not None else None
    if manifest is None and deep:
        scanned = scan_dataset(ds)
        top = scanned.max_token_id
        if cache:
            try:
                write_manifest(ds.path_prefix, scanned)
                notes.append(f"wrote {mpath} from this scan: later checks will detect changes from now on")
            except OSError:
                pass
    if vocab_size is not None:
        top = check_token_range(ds.path_prefix, vocab_size, cache=cache)
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
        max_token_id=top,
        notes=tuple(notes),
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
    the files and their directory around the final renames. ``manifest=True`` (the
    default) writes ``<prefix>.manifest.json`` after them (see :class:`DatasetManifest`).
    """

    def __init__(self, bin_path: PathLike, dtype=np.int32, *, durable: bool = False, manifest: bool = True) -> None:
        from megatron_ext import _native

        self.durable = durable
        self.manifest = manifest
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
        """Write the index and move ``.bin`` then ``.idx`` into place, then the manifest.

        A manifest of an earlier dataset at the same prefix is removed first, so a crash
        between the renames leaves files without a manifest, never a wrong one.
        """
        idx_path = os.fspath(idx_path)
        prefix = idx_path[: -len(".idx")] if idx_path.endswith(".idx") else idx_path
        if self.manifest:
            try:
                os.unlink(manifest_file_path(prefix))
            except FileNotFoundError:
                pass
        self._builder.finalize(idx_path)
        if self.manifest:
            span = self._builder.token_range
            bin_crc, idx_crc = self._builder.checksums
            sequences = self._builder.sequence_count
            documents = self._builder.document_count
            write_manifest(prefix, DatasetManifest(
                origin="builder", dtype=np.dtype(self.dtype).name, documents=documents, sequences=sequences,
                tokens=self._builder.token_count, bin_bytes=self._builder.token_count * np.dtype(self.dtype).itemsize,
                idx_bytes=HEADER_BYTES + 12 * sequences + 8 * (documents + 1), bin_crc32=bin_crc, idx_crc32=idx_crc,
                min_token_id=None if span is None else span[0], max_token_id=None if span is None else span[1],
                bin_ends_crc32=ends_crc32(self._builder.bin_path),
            ), durable=self.durable)

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

    @property
    def token_range(self) -> Optional[tuple[int, int]]:
        """(smallest, largest) token id written so far; None while there are no tokens."""
        return self._builder.token_range

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

    Every input is checked first (:func:`verify_dataset`), so a missing or broken input,
    or mixed dtypes, raise (naming the files) before anything is written. Stale
    temporaries of an interrupted merge into the same output are removed; the output
    gets its manifest.
    """
    prefixes = [os.fspath(p) for p in prefixes]
    output_prefix = os.fspath(output_prefix)
    if not prefixes:
        raise IndexedDatasetError("nothing to merge: no .bin/.idx pairs given")
    out = os.path.abspath(output_prefix)
    dtype = first = None
    for prefix in prefixes:
        if os.path.abspath(prefix) == out:
            raise IndexedDatasetError(f"{index_file_path(prefix)}: the output prefix is also an input")
        ds = verify_dataset(prefix)
        if dtype is None:
            dtype, first = ds.dtype, prefix
        elif ds.dtype != dtype:
            raise IndexedDatasetError(
                f"{index_file_path(prefix)}: dtype {ds.dtype.__name__} differs from "
                f"{index_file_path(first)} ({dtype.__name__}); refusing to merge mixed dtypes"
            )
        del ds
    remove_stale_temporaries(output_prefix)
    with IndexedDatasetBuilder(data_file_path(output_prefix), dtype=dtype, durable=durable) as builder:
        for prefix in prefixes:
            builder.add_index(prefix)
        builder.finalize(index_file_path(output_prefix))
