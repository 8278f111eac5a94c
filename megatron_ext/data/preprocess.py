"""Tokenize a corpus into Megatron's .bin/.idx datasets, in parallel, byte-identical to
Megatron-LM's ``tools/preprocess_data.py``.

For every JSON key the output is ``<output_prefix>_<key>_document.bin/.idx``, the
bytes Megatron-LM writes for the same input and tokenizer:

* each key of each line is tokenized; a value may be a string or a list of strings
  (pre-split sentences), each string is tokenized on its own and strings with no tokens
  are dropped; the document is added with ``add_document(ids, sentence_lengths)``;
* ``append_eod`` appends the tokenizer's ``eod`` to the last sentence of every document
  that has tokens;
* a document with no tokens adds no sequence but, as in Megatron-LM, still closes a
  (zero-sequence) entry in the document index, so document ``k`` of the index is line
  ``k`` of the input. Such documents are counted as ``empty`` in the summary;
* the token dtype is uint16 below a vocabulary of 65,500 and int32 above;
* documents keep the input order; with ``partitions > 1`` the order is Megatron-LM's:
  lines are dealt round-robin to the partitions (counting every physical line, across
  files) and the partitions are concatenated, unless ``keep_sequential_samples``, where
  the partitions are contiguous and the order is the input order.

How the work is split: the main thread reads the input in blocks of whole lines and
hands them to ``workers`` workers, which parse the JSON and tokenize the block with one
batch call of the tokenizer library; the main thread takes the results back in input
order and the native builder writes them. At most ``2 * workers + 1`` blocks are in
flight, so memory does not grow with the corpus. The workers are threads
(``backend="thread"``, the default: SentencePiece >= 0.2.3 and ``tokenizers`` encode
without the GIL) or forked processes (``backend="process"``: about as fast on two cores,
twice the memory; only the tokens travel back, as numpy arrays).

Input files: ``*.txt`` (also ``*.txt.gz``, ``*.txt.zst``) are plain text, one document per
file (the whole file, under the first JSON key); anything else is JSON lines, compressed
when the name ends in ``.gz`` or ``.zst``. Blank lines are ignored. A UTF-8 byte order mark at the start
of a file is ignored.

Errors name ``file:line``. A malformed line (bad JSON, not an object, a missing key, a
value that is not a string or list of strings, invalid UTF-8) stops the run, or with
``skip_bad_lines`` is counted and skipped. The tokenizer, the inputs and the output
directory are all checked before any tokenizing; nothing appears at the output paths
unless the run completes (the builder writes temporaries and renames them at the end).
An input without a single token is refused, naming it (``allow_empty`` permits it).
Temporaries a killed run left for the same outputs are removed at start (only those no
live process holds, see ``indexed_dataset.remove_stale_temporaries``); process workers
die with the main process.

This module needs neither torch nor megatron-core.
"""
from __future__ import annotations

import glob
import gzip
import json
import multiprocessing
import os
import sys
import tempfile
import time
import zlib
from collections import deque
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional, Sequence, Tuple

import numpy as np

from megatron_ext.errors import InputError
from megatron_ext.data.indexed_dataset import (
    IndexedDatasetBuilder,
    WorkDirectory,
    remove_stale_temporaries,
    data_file_path,
    dtype_for_vocab,
    index_file_path,
)
from megatron_ext.data.tokenizers import Tokenizer, build_tokenizer

BACKENDS = ("thread", "process")
DEFAULT_CHUNK_BYTES = 1 << 18
MAX_DOCS_PER_CHUNK = 2048
_MAX_BAD_LINE_MESSAGES = 20
_UTF8_BOM = b"\xef\xbb\xbf"


class PreprocessError(InputError):
    """Bad input, flags or output location; the message names the file (and line)."""


class EmptyInputError(PreprocessError):
    """The input holds no tokens at all (refused unless ``allow_empty``)."""


@dataclass(frozen=True)
class InputFile:
    path: str
    kind: str  # "jsonl" or "text"
    compressed: bool


@dataclass(frozen=True)
class PreprocessConfig:
    """One run; the fields are the command-line flags of ``tools/preprocess_data.py``.

    ``inputs`` are files or glob patterns; ``backend`` is ``"thread"`` or ``"process"``;
    ``chunk_bytes`` is the size of the blocks handed to the workers.
    """

    inputs: Sequence[str]
    output_prefix: str
    tokenizer_type: str
    tokenizer_model: str
    json_keys: Sequence[str] = ("text",)
    append_eod: bool = False
    workers: int = 1
    partitions: int = 1
    keep_sequential_samples: bool = False
    log_interval: int = 1000
    skip_bad_lines: bool = False
    legacy_tokenizer: bool = False
    backend: str = "thread"
    chunk_bytes: int = DEFAULT_CHUNK_BYTES
    allow_empty: bool = False


@dataclass
class PreprocessResult:
    documents: int = 0
    tokens: int = 0
    empty_documents: int = 0
    bad_lines: int = 0
    blank_lines: int = 0
    input_bytes: int = 0
    seconds: float = 0.0
    outputs: dict = field(default_factory=dict)  # key -> output prefix

    def summary(self) -> str:
        rate = self.tokens / self.seconds if self.seconds > 0 else 0.0
        return (
            f"Done: {self.documents} documents, {self.tokens} tokens, {self.empty_documents} empty, "
            f"{self.bad_lines} bad lines skipped, {self.blank_lines} blank lines, "
            f"{self.input_bytes / 1e6:.1f} MB in {self.seconds:.2f} s ({rate:,.0f} tokens/s)"
        )


def output_prefix_for_key(output_prefix: str, key: str) -> str:
    """``<output_prefix>_<key>_document``, Megatron-LM's naming."""
    return f"{output_prefix}_{key}_document"


# -- checks done before any tokenizing ---------------------------------------------------


def _input_kind(path: str) -> InputFile:
    compressed = path.endswith((".gz", ".zst"))
    stem = path.rsplit(".", 1)[0] if compressed else path
    return InputFile(path, "text" if stem.endswith(".txt") else "jsonl", compressed)


def resolve_inputs(patterns: Sequence[str]) -> list[InputFile]:
    """Files named by ``patterns`` (paths or globs, each glob sorted), in order."""
    if isinstance(patterns, (str, os.PathLike)):
        patterns = [patterns]
    if not patterns:
        raise PreprocessError("--input: no input given")
    files: list[InputFile] = []
    for pattern in patterns:
        pattern = os.fspath(pattern)
        if os.path.isdir(pattern):
            raise PreprocessError(f"--input {pattern}: is a directory; give files or a glob such as {pattern}/*.jsonl")
        if os.path.isfile(pattern):
            matches = [pattern]
        else:
            matches = sorted(p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p))
            if not matches:
                raise PreprocessError(f"--input {pattern!r}: matches no files")
        files.extend(_input_kind(p) for p in matches)
    return files


def check_output_location(output_prefix: str, keys: Sequence[str]) -> None:
    """Fail now, before any work, if the outputs cannot be written."""
    if not output_prefix:
        raise PreprocessError("--output-prefix is empty")
    directory = os.path.dirname(os.path.abspath(output_prefix))
    if not os.path.isdir(directory):
        raise PreprocessError(f"--output-prefix {output_prefix}: directory {directory} does not exist")
    for key in keys:
        for path in (data_file_path(output_prefix_for_key(output_prefix, key)),
                     index_file_path(output_prefix_for_key(output_prefix, key))):
            if os.path.isdir(path):
                raise PreprocessError(f"--output-prefix {output_prefix}: output {path} is a directory")
    try:
        fd, probe = tempfile.mkstemp(prefix=".write-test-", dir=directory)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise PreprocessError(f"--output-prefix {output_prefix}: cannot write in {directory}: {e.strerror}") from None


def _check_config(config: PreprocessConfig) -> None:
    if config.backend not in BACKENDS:
        raise PreprocessError(f"--worker-backend {config.backend!r}: choose one of {', '.join(BACKENDS)}")
    for name in ("workers", "partitions", "log_interval", "chunk_bytes"):
        if int(getattr(config, name)) < 1:
            raise PreprocessError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(config, name)}")
    keys = list(config.json_keys)
    if not keys or any(not isinstance(k, str) or not k for k in keys):
        raise PreprocessError(f"--json-keys must name at least one non-empty key, got {keys}")
    if len(set(keys)) != len(keys):
        raise PreprocessError(f"--json-keys has duplicates: {keys}")


# -- reading -----------------------------------------------------------------------------


@dataclass
class Chunk:
    """A block of input: whole JSON lines of one file, or several whole text files."""

    source: str  # file name (JSON lines)
    first_line: int  # 1-based line number of the first line in ``data``
    first_index: int  # position of the first line / file in the whole input (for partitions)
    data: bytes = b""  # JSON lines, each ending in b"\n" except possibly the file's last
    texts: list = field(default_factory=list)  # [(file name, bytes)] for text inputs


def _open_binary(f: InputFile):
    if f.path.endswith(".zst"):
        from megatron_ext.data.prepare.inputs import open_zstd  # zstandard module or the zstd program

        return open_zstd(f.path)
    try:
        return gzip.open(f.path, "rb") if f.compressed else open(f.path, "rb")
    except OSError as e:
        raise PreprocessError(f"{f.path}: cannot open: {e.strerror or e}") from None


def whole_line_blocks(read: Callable[[int], bytes], block_bytes: int) -> Iterator[Tuple[int, bytes, bool]]:
    """``(first line number, whole lines, is the tail)`` blocks of a byte stream read
    ``block_bytes`` at a time: a leading UTF-8 BOM is dropped and no line is split; the tail
    is a last line without its newline."""
    line_no, carry, first = 1, b"", True
    while True:
        block = read(block_bytes)
        if first and block.startswith(_UTF8_BOM):
            block = block[3:]
        first = False
        if not block:
            break
        data = carry + block if carry else block
        cut = data.rfind(b"\n") + 1
        if cut == 0:
            carry = data
            continue
        whole, carry = data[:cut], data[cut:]
        yield line_no, whole, False
        line_no += whole.count(b"\n")
    if carry:
        yield line_no, carry, True


BLANK_LINE = object()  # what ``json_lines`` gives for an empty or all-space line


def json_lines(data: bytes, source: str, first_line: int) -> Iterator[Tuple[int, str, object, Optional[str]]]:
    """``(index, "file:line", parsed object, problem)`` for each line of a block of whole lines:
    the object is ``BLANK_LINE`` for a blank line; ``problem`` says why a line does not parse
    (invalid UTF-8, malformed JSON), and is None otherwise."""
    lines = data.split(b"\n")
    if data.endswith(b"\n"):
        lines.pop()
    for i, raw in enumerate(lines):
        where = f"{source}:{first_line + i}"
        if not raw.strip():
            yield i, where, BLANK_LINE, None
            continue
        try:
            yield i, where, json.loads(raw.decode("utf-8")), None
        except UnicodeDecodeError as e:
            yield i, where, None, f"not valid UTF-8 at byte {e.start}"
        except ValueError as e:
            yield i, where, None, f"malformed JSON: {e}"


def read_chunks(files: Sequence[InputFile], chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> Iterator[Chunk]:
    """Cut the inputs into chunks of about ``chunk_bytes``, never splitting a line."""
    index = 0  # physical lines (JSON) or files (text) so far, across all inputs
    texts: list = []
    text_bytes = 0
    text_first = 0
    for f in files:
        if f.kind == "text":
            with _open_binary(f) as fh:
                try:
                    data = fh.read()
                except (OSError, EOFError, zlib.error) as e:
                    raise PreprocessError(f"{f.path}: cannot read: {e}") from None
            if not texts:
                text_first = index
            texts.append((f.path, data[3:] if data.startswith(_UTF8_BOM) else data))
            text_bytes += len(data)
            index += 1
            if text_bytes >= chunk_bytes or len(texts) >= MAX_DOCS_PER_CHUNK:
                yield Chunk("", 1, text_first, texts=texts)
                texts, text_bytes = [], 0
            continue
        if texts:
            yield Chunk("", 1, text_first, texts=texts)
            texts, text_bytes = [], 0
        with _open_binary(f) as fh:
            def read(n: int, fh=fh, path=f.path) -> bytes:
                try:
                    return fh.read(n)
                except (OSError, EOFError, zlib.error) as e:
                    raise PreprocessError(f"{path}: cannot read: {e}") from None

            for line_no, whole, _ in whole_line_blocks(read, chunk_bytes):
                yield Chunk(f.path, line_no, index, whole)
                index += whole.count(b"\n") or 1  # a last line without its newline counts once
    if texts:
        yield Chunk("", 1, text_first, texts=texts)


# -- encoding (runs in the workers) ------------------------------------------------------


@dataclass
class EncodedKey:
    tokens: np.ndarray  # all tokens of the chunk's documents for this key, in the output dtype
    seq_lens: np.ndarray  # int64 sentence lengths
    tok_offsets: np.ndarray  # document d is tokens[tok_offsets[d]:tok_offsets[d+1]]
    seq_offsets: np.ndarray  # and seq_lens[seq_offsets[d]:seq_offsets[d+1]]


@dataclass
class EncodedChunk:
    doc_index: np.ndarray  # position of each document in the whole input (for partitions)
    keys: dict  # key -> EncodedKey
    tokens: int = 0
    empty_documents: int = 0
    bad_lines: int = 0
    blank_lines: int = 0
    input_bytes: int = 0
    bad_messages: list = field(default_factory=list)

    @property
    def documents(self) -> int:
        return int(self.doc_index.shape[0])


class ChunkEncoder:
    """Turns a :class:`Chunk` into token arrays, following Megatron-LM's ``Encoder.encode``."""

    def __init__(self, tokenizer: Tokenizer, json_keys: Sequence[str], append_eod: bool,
                 skip_bad_lines: bool, dtype) -> None:
        self.tokenizer = tokenizer
        self.json_keys = list(json_keys)
        self.append_eod = append_eod
        self.skip_bad_lines = skip_bad_lines
        self.dtype = np.dtype(dtype)
        if append_eod and tokenizer.eod is None:
            raise PreprocessError(f"--append-eod: tokenizer {tokenizer.path} defines no end-of-document token")

    def _bad(self, out: EncodedChunk, where: str, message: str) -> None:
        if not self.skip_bad_lines:
            raise PreprocessError(f"{where}: {message} (use --skip-bad-lines to skip such lines)")
        out.bad_lines += 1
        if len(out.bad_messages) < _MAX_BAD_LINE_MESSAGES:
            out.bad_messages.append(f"{where}: {message}")

    def _fields(self, obj, where: str, out: EncodedChunk) -> Optional[list]:
        """The sentence list of each key, or None (after reporting) for a bad line."""
        if not isinstance(obj, dict):
            self._bad(out, where, f"expected a JSON object, got {type(obj).__name__}")
            return None
        fields = []
        for key in self.json_keys:
            if key not in obj:
                self._bad(out, where, f"missing key {key!r}")
                return None
            value = obj[key]
            if isinstance(value, str):
                fields.append([value])
            elif isinstance(value, list) and all(isinstance(s, str) for s in value):
                fields.append(value)
            else:
                self._bad(out, where, f"key {key!r} is {type(value).__name__}, not a string or a list of strings")
                return None
        return fields

    def __call__(self, chunk: Chunk) -> EncodedChunk:
        out = EncodedChunk(doc_index=np.zeros(0, np.int64), keys={})
        docs: list = []  # per document: list (per key) of sentence lists
        where_of: list = []
        doc_index: list = []
        if chunk.texts:
            for i, (name, data) in enumerate(chunk.texts):
                out.input_bytes += len(data)
                try:
                    text = data.decode("utf-8")
                except UnicodeDecodeError as e:
                    self._bad(out, name, f"not valid UTF-8 at byte {e.start}")
                    continue
                docs.append([[text]])
                where_of.append(name)
                doc_index.append(chunk.first_index + i)
        else:
            out.input_bytes = len(chunk.data)
            for i, where, obj, problem in json_lines(chunk.data, chunk.source, chunk.first_line):
                if problem is not None:
                    self._bad(out, where, problem)
                    continue
                if obj is BLANK_LINE:
                    out.blank_lines += 1
                    continue
                fields = self._fields(obj, where, out)
                if fields is None:
                    continue
                docs.append(fields)
                where_of.append(where)
                doc_index.append(chunk.first_index + i)
        try:
            encoded = [self._encode_key([d[k] for d in docs]) for k in range(len(self.json_keys))]
        except (TypeError, ValueError, RuntimeError):
            # The tokenizer refused a text of the batch (a lone surrogate from a JSON escape
            # cannot be UTF-8): name the line, or skip it, and encode the rest again.
            docs, doc_index = self._drop_unencodable(docs, where_of, doc_index, out)
            encoded = [self._encode_key([d[k] for d in docs]) for k in range(len(self.json_keys))]
        out.doc_index = np.asarray(doc_index, dtype=np.int64)
        doc_tokens = np.zeros(len(docs), np.int64)
        for key, e in zip(self.json_keys, encoded):
            out.keys[key] = e
            doc_tokens += np.diff(e.tok_offsets)
        out.tokens = int(doc_tokens.sum())
        out.empty_documents = int(np.count_nonzero(doc_tokens == 0))
        return out

    def _drop_unencodable(self, docs, where_of, doc_index, out):
        good = []
        for d, fields in enumerate(docs):
            try:
                for sentences in fields:
                    for s in sentences:
                        if not s.isascii():
                            s.encode("utf-8")
            except UnicodeEncodeError as e:
                self._bad(out, where_of[d], f"text cannot be encoded as UTF-8 ({e.reason})")
                continue
            good.append(d)
        if len(good) == len(docs):
            return docs, doc_index
        return [docs[d] for d in good], [doc_index[d] for d in good]

    def _encode_key(self, fields: list) -> EncodedKey:
        flat = [s for sentences in fields for s in sentences]
        arrays = self.tokenizer.tokenize_arrays(flat, num_threads=1)
        eod = None if not self.append_eod else np.asarray([self.tokenizer.eod], np.int32)
        pieces: list = []
        seq_lens: list = []
        tok_offsets = np.zeros(len(fields) + 1, np.int64)
        seq_offsets = np.zeros(len(fields) + 1, np.int64)
        pos = n_tok = 0
        for d, sentences in enumerate(fields):
            start_lens = len(seq_lens)
            for _ in sentences:
                a = arrays[pos]
                pos += 1
                if a.shape[0] > 0:
                    pieces.append(a)
                    seq_lens.append(a.shape[0])
                    n_tok += a.shape[0]
            if eod is not None and len(seq_lens) > start_lens:
                pieces.append(eod)
                seq_lens[-1] += 1
                n_tok += 1
            tok_offsets[d + 1] = n_tok
            seq_offsets[d + 1] = len(seq_lens)
        tokens = np.concatenate(pieces) if pieces else np.zeros(0, np.int32)
        if tokens.size and (tokens.min() < 0 or tokens.max() > np.iinfo(self.dtype).max):
            raise PreprocessError(
                f"tokenizer {self.tokenizer.path} produced id {int(tokens.min() if tokens.min() < 0 else tokens.max())} "
                f"outside {self.dtype.name}"
            )
        return EncodedKey(tokens.astype(self.dtype, copy=False), np.asarray(seq_lens, np.int64),
                          tok_offsets, seq_offsets)


_worker_encoder: Optional[ChunkEncoder] = None


def _exit_with_parent(parent: int) -> None:
    """End this worker process when ``parent`` dies (else a killed run leaves it hung)."""
    if sys.platform.startswith("linux"):
        try:
            import ctypes
            import signal

            libc = ctypes.CDLL(None, use_errno=True)
            if libc.prctl(1, signal.SIGKILL, 0, 0, 0) == 0:  # PR_SET_PDEATHSIG
                if os.getppid() != parent:  # it died before the request
                    os._exit(1)
                return
        except (OSError, AttributeError):
            pass
    import threading

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def _init_process_worker(encoder: ChunkEncoder, parent: int) -> None:
    global _worker_encoder
    _exit_with_parent(parent)
    _worker_encoder = encoder
    # One tokenizer thread per worker process (the ``tokenizers`` library would otherwise
    # start a thread per CPU in every worker).
    os.environ.setdefault("RAYON_NUM_THREADS", "1")


def _encode_in_process(chunk: Chunk) -> EncodedChunk:
    return _worker_encoder(chunk)


# -- the run -----------------------------------------------------------------------------


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _in_order(executor, fn, chunks: Iterator[Chunk], max_inflight: int) -> Iterator[EncodedChunk]:
    pending: deque = deque()
    for chunk in chunks:
        pending.append(executor.submit(fn, chunk))
        if len(pending) >= max_inflight:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


def _make_executor(config: PreprocessConfig, encoder: ChunkEncoder):
    if config.backend == "thread":
        return ThreadPoolExecutor(max_workers=config.workers, thread_name_prefix="tokenize"), encoder
    methods = multiprocessing.get_all_start_methods()
    context = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
    executor = ProcessPoolExecutor(max_workers=config.workers, mp_context=context,
                                   initializer=_init_process_worker, initargs=(encoder, os.getpid()))
    return executor, _encode_in_process


def preprocess(config: PreprocessConfig, log: Optional[Callable[[str], None]] = _stderr) -> PreprocessResult:
    """Run the whole preprocessing; see the module docstring. Returns the counts."""
    start = time.perf_counter()
    log = log or (lambda message: None)
    _check_config(config)
    keys = list(config.json_keys)
    # Everything that can be checked is checked before reading any input.
    tokenizer = build_tokenizer(config.tokenizer_type, config.tokenizer_model, legacy=config.legacy_tokenizer)
    files = resolve_inputs(config.inputs)
    if len(keys) != 1 and any(f.kind == "text" for f in files):
        raise PreprocessError(f"--json-keys {keys}: plain-text inputs (*.txt) hold one document per file, give one key")
    check_output_location(config.output_prefix, keys)
    # Temporaries left by a killed run of the same outputs (a live run's are locked, kept).
    for prefix in [config.output_prefix] + [output_prefix_for_key(config.output_prefix, key) for key in keys]:
        for path in remove_stale_temporaries(prefix):
            log(f"removed {path}, a temporary left by an interrupted run")
    dtype = dtype_for_vocab(tokenizer.vocab_size)
    encoder = ChunkEncoder(tokenizer, keys, config.append_eod, config.skip_bad_lines, dtype)

    round_robin = config.partitions > 1 and not config.keep_sequential_samples
    n_parts = config.partitions if round_robin else 1
    part_dir = None
    builders: list = []  # [partition][key]
    result = PreprocessResult()
    executor = None
    try:
        if round_robin:
            part_dir = WorkDirectory(config.output_prefix, "partitions")
            prefixes = [[output_prefix_for_key(os.path.join(part_dir.path, f"part{p}"), key) for key in keys]
                        for p in range(n_parts)]
        else:
            prefixes = [[output_prefix_for_key(config.output_prefix, key) for key in keys]]
        for row in prefixes:
            builders.append([IndexedDatasetBuilder(data_file_path(prefix), dtype) for prefix in row])

        executor, fn = _make_executor(config, encoder)
        chunks = read_chunks(files, config.chunk_bytes)
        run_start = time.perf_counter()
        next_log = config.log_interval
        shown_bad = 0
        for enc in _in_order(executor, fn, chunks, 2 * config.workers + 1):
            _write_chunk(enc, keys, builders, n_parts)
            result.documents += enc.documents
            result.tokens += enc.tokens
            result.empty_documents += enc.empty_documents
            result.bad_lines += enc.bad_lines
            result.blank_lines += enc.blank_lines
            result.input_bytes += enc.input_bytes
            for message in enc.bad_messages:
                if shown_bad < _MAX_BAD_LINE_MESSAGES:
                    log(f"skipped bad line {message}")
                elif shown_bad == _MAX_BAD_LINE_MESSAGES:
                    log("(further skipped lines not shown)")
                shown_bad += 1
            if result.documents >= next_log:
                elapsed = max(time.perf_counter() - run_start, 1e-9)
                log(f"Processed {result.documents} documents ({result.documents / elapsed:.1f} docs/s, "
                    f"{result.tokens / elapsed:,.0f} tokens/s, {result.input_bytes / elapsed / 2**20:.2f} MB/s).")
                next_log = (result.documents // config.log_interval + 1) * config.log_interval
        executor.shutdown(wait=True)
        executor = None
        if result.tokens == 0 and not config.allow_empty:
            names = [f.path for f in files]
            shown = " ".join(names[:3]) + (f" (and {len(names) - 3} more)" if len(names) > 3 else "")
            raise EmptyInputError(
                f"--input {shown}: no tokens in {result.documents} documents "
                f"({result.blank_lines} blank lines, {result.bad_lines} bad lines skipped); nothing written "
                f"(--allow-empty writes the empty dataset)")

        if round_robin:
            for p, row in enumerate(builders):
                for k, builder in enumerate(row):
                    builder.finalize(index_file_path(prefixes[p][k]))
            for k, key in enumerate(keys):
                final = output_prefix_for_key(config.output_prefix, key)
                merged = IndexedDatasetBuilder(data_file_path(final), dtype)
                try:
                    for p in range(n_parts):
                        merged.add_index(prefixes[p][k])
                    merged.finalize(index_file_path(final))
                except BaseException:
                    merged.discard()
                    raise
        else:
            for k, key in enumerate(keys):
                builders[0][k].finalize(index_file_path(output_prefix_for_key(config.output_prefix, key)))
        builders = []
    finally:
        if executor is not None:
            executor.shutdown(wait=True, cancel_futures=True)
        for row in builders:
            for builder in row:
                builder.discard()
        if part_dir is not None:
            part_dir.close()

    result.outputs = {key: output_prefix_for_key(config.output_prefix, key) for key in keys}
    result.seconds = time.perf_counter() - start
    log(result.summary())
    return result


def _write_chunk(enc: EncodedChunk, keys: list, builders: list, n_parts: int) -> None:
    parts = enc.doc_index % n_parts if n_parts > 1 else None
    for k, key in enumerate(keys):
        e = enc.keys[key]
        tokens, lens, to, so = e.tokens, e.seq_lens, e.tok_offsets, e.seq_offsets
        for d in range(enc.documents):
            builder = builders[int(parts[d]) if parts is not None else 0][k]
            builder.add_document(tokens[to[d]:to[d + 1]], lens[so[d]:so[d + 1]])
