"""Finding and reading the inputs: files, directories and globs; JSON lines or plain text;
plain, gzip or zstd. Reading streams in blocks of whole lines, so memory does not depend on
the file sizes (except a plain-text file read as one document).

* ``*.jsonl`` / ``*.json`` (anything that is not ``*.txt``) are JSON lines;
* ``*.txt`` is plain text: one document per file, or with ``text_docs_per`` ``paragraph``
  (text between blank lines) or ``line`` (each non-blank line);
* ``.gz`` and ``.zst`` on top of either are decompressed on the fly (zstd through the
  ``zstandard`` module when installed, else the ``zstd`` program);
* a directory stands for the files under it with those names, recursively, sorted.

Every document carries where it came from (``file:line``) for error messages.
"""
from __future__ import annotations

import glob
import gzip
import os
import shutil
import subprocess
import zlib
from dataclasses import dataclass, field
from typing import Iterator, Sequence

from megatron_ext.data.preprocess import PreprocessError, whole_line_blocks

TEXT_DOCS_PER = ("file", "paragraph", "line")
_KNOWN = (".jsonl", ".json", ".txt")


@dataclass(frozen=True)
class InputFile:
    path: str
    kind: str  # "jsonl" or "text"
    compression: str  # "", "gz" or "zst"
    size: int  # bytes on disk


@dataclass
class RawBlock:
    """Whole JSON lines of one file (``jsonl``), or plain-text documents (``docs``)."""

    source: str
    first_line: int
    jsonl: bytes = b""
    docs: list = field(default_factory=list)  # [(where, bytes)]
    bytes_done: int = 0  # input bytes on disk consumed so far, for the progress line


def input_file(path: str) -> InputFile:
    compression = next((c for c in ("gz", "zst") if path.endswith("." + c)), "")
    stem = path[: -len(compression) - 1] if compression else path
    return InputFile(path, "text" if stem.endswith(".txt") else "jsonl", compression, os.path.getsize(path))


def _in_directory(directory: str) -> list[str]:
    found = []
    for root, dirs, names in os.walk(directory):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in names:
            stem = name.rsplit(".", 1)[0] if name.endswith((".gz", ".zst")) else name
            if not name.startswith(".") and stem.endswith(_KNOWN):
                found.append(os.path.join(root, name))
    return sorted(found)


def resolve_inputs(patterns: Sequence[str]) -> list[InputFile]:
    """Files named by ``patterns`` (files, directories, globs), in the order given."""
    if isinstance(patterns, (str, os.PathLike)):
        patterns = [patterns]
    if not patterns:
        raise PreprocessError("--input: no input given")
    files: list[str] = []
    for pattern in map(os.fspath, patterns):
        if os.path.isdir(pattern):
            matches = _in_directory(pattern)
            if not matches:
                raise PreprocessError(f"--input {pattern}: directory holds no *.jsonl, *.json or *.txt files "
                                      f"(optionally .gz or .zst)")
        elif os.path.isfile(pattern):
            matches = [pattern]
        else:
            matches = []
            for p in sorted(glob.glob(pattern, recursive=True)):
                matches.extend(_in_directory(p) if os.path.isdir(p) else [p])
            if not matches:
                raise PreprocessError(f"--input {pattern!r}: matches no files")
        files.extend(matches)
    return [input_file(p) for p in files]


class _ZstdProcess:
    """``zstd -dc`` as a readable stream, for machines without the zstandard module. Over an
    open file ``raw``, the program reads that file as its standard input: the two share the
    file's offset, so ``raw.tell()`` says how much of the file the program has read."""

    def __init__(self, path: str, raw=None) -> None:
        self.path = path
        # Its complaint (a line or two) is kept for the error, which names the file.
        if raw is None:
            self.proc = subprocess.Popen(["zstd", "-dcq", path], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        else:
            self.proc = subprocess.Popen(["zstd", "-dcq"], stdin=raw, stdout=subprocess.PIPE, stderr=subprocess.PIPE)

    def read(self, n: int = -1) -> bytes:
        return self.proc.stdout.read(n)

    def close(self, failed: bool = False) -> None:
        if self.proc.stderr.closed:  # closed before
            return
        self.proc.stdout.close()
        if failed:
            self.proc.kill()
        said = self.proc.stderr.read().decode("utf-8", "replace").strip()
        self.proc.stderr.close()
        if self.proc.wait() != 0 and not failed:
            said = said.splitlines()[-1].replace("/*stdin*\\", self.path) if said else "corrupt or truncated file?"
            raise PreprocessError(f"{self.path}: cannot read: zstd -d exited with status {self.proc.returncode} "
                                  f"({said})")

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close(failed=exc_type is not None)


def open_zstd(path: str, raw=None):
    """A binary stream of the decompressed ``path`` (over ``raw`` when given)."""
    try:
        import zstandard
    except ImportError:
        if shutil.which("zstd") is None:
            raise PreprocessError(f"{path}: reading .zst needs the zstandard module or the zstd program") from None
        return _ZstdProcess(path, raw)
    return zstandard.ZstdDecompressor().stream_reader(raw if raw is not None else open(path, "rb"), closefd=True)


class _Opened:
    """A decompressing reader over one file that knows how many of the file's bytes (compressed
    ones for .gz and .zst) it consumed, so the progress line's MB/s and ETA refer to the sizes
    on disk."""

    def __init__(self, f: InputFile) -> None:
        self.raw = open(f.path, "rb")
        if f.compression == "gz":
            self.stream = gzip.GzipFile(fileobj=self.raw)
        elif f.compression == "zst":
            self.stream = open_zstd(f.path, self.raw)
        else:
            self.stream = self.raw

    def read(self, n: int) -> bytes:
        return self.stream.read(n)

    def consumed(self) -> int:
        # The zstd program moves the offset that raw.tell() asks the system for (see _ZstdProcess).
        return self.raw.tell()

    def close(self, failed: bool = False) -> None:
        try:
            if isinstance(self.stream, _ZstdProcess):
                self.stream.close(failed)
            else:
                self.stream.close()
        finally:
            self.raw.close()


def _lines_of(f: InputFile, block_bytes: int, done_before: int) -> Iterator[tuple[int, bytes, int]]:
    """(first line number, whole lines, bytes done) blocks of one file."""
    try:
        opened = _Opened(f)
    except OSError as e:
        raise PreprocessError(f"{f.path}: cannot open: {e.strerror or e}") from None
    try:
        for line_no, whole, tail in whole_line_blocks(opened.read, block_bytes):
            yield line_no, whole, done_before + (f.size if tail else opened.consumed())
        opened.close()
    except (OSError, EOFError, zlib.error) as e:
        opened.close(failed=True)
        raise PreprocessError(f"{f.path}: cannot read: {e}") from None
    except BaseException:
        opened.close(failed=True)
        raise


def _text_docs(f: InputFile, per: str, block_bytes: int, done: int) -> Iterator[RawBlock]:
    if per == "file":
        parts = [data for _, data, _ in _lines_of(f, 1 << 22, done)]
        yield RawBlock(f.path, 1, docs=[(f.path, b"".join(parts))], bytes_done=done + f.size)
        return
    open_paragraph: list = []  # [start line, lines...] of a paragraph still going on
    for first_line, data, bytes_done in _lines_of(f, block_bytes, done):
        lines = data.split(b"\n")
        if data.endswith(b"\n"):
            lines.pop()
        if per == "line":
            docs = [(f"{f.path}:{first_line + i}", line) for i, line in enumerate(lines) if line.strip()]
        else:
            docs = _paragraphs(f.path, first_line, lines, open_paragraph)
        yield RawBlock(f.path, first_line, docs=docs, bytes_done=bytes_done)
    if open_paragraph:
        where = f"{f.path}:{open_paragraph[0]}"
        yield RawBlock(f.path, open_paragraph[0], docs=[(where, b"\n".join(open_paragraph[1:]))],
                       bytes_done=done + f.size)


def _paragraphs(path: str, first_line: int, lines: list, current: list) -> list:
    """The paragraphs that end in this block; ``current`` carries one still open at its end."""
    docs = []
    for i, line in enumerate(lines):
        if line.strip():
            if not current:
                current.append(first_line + i)
            current.append(line)
        elif current:
            docs.append((f"{path}:{current[0]}", b"\n".join(current[1:])))
            current.clear()
    return docs


def read_blocks(files: Sequence[InputFile], block_bytes: int, text_docs_per: str = "file") -> Iterator[RawBlock]:
    """The inputs as blocks of about ``block_bytes``, in input order."""
    done = 0
    for f in files:
        if f.kind == "text":
            yield from _text_docs(f, text_docs_per, block_bytes, done)
        else:
            for first_line, data, bytes_done in _lines_of(f, block_bytes, done):
                yield RawBlock(f.path, first_line, jsonl=data, bytes_done=bytes_done)
        done += f.size
