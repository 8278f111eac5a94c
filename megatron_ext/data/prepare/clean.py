"""The cleaning stage, run by the workers on each input block: parse, normalize, filter,
and compute the digests that deduplication and the split need. Everything that needs the
whole corpus (which digest came first) is left to the main thread.
"""
from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Iterator, Optional

import numpy as np

from megatron_ext.data.preprocess import BLANK_LINE, PreprocessError, json_lines
from megatron_ext.data.prepare.dedup import digests_array, digests_of
from megatron_ext.data.prepare.filters import DocumentFilter
from megatron_ext.data.prepare.inputs import RawBlock
from megatron_ext.data.prepare.normalize import normalize_text

_MAX_BAD_MESSAGES = 20
PARAGRAPH_BREAK = re.compile(r"\n[ \t]*\n\s*")
_scan_json = json.JSONDecoder().scan_once  # what json.loads runs after its checks (C; shared safely, as json.loads's)
_JSON_SPACE = " \t\n\r"  # the whitespace JSON allows around a value


@dataclass
class CleanBlock:
    wheres: list = field(default_factory=list)  # file:line of each kept document
    texts: list = field(default_factory=list)  # its cleaned text (str)
    data: list = field(default_factory=list)  # and its UTF-8
    digests: np.ndarray = field(default_factory=lambda: np.zeros((0, 2), np.uint64))
    paragraphs: Optional[list] = None  # per document: its paragraphs (str)
    paragraph_digests: Optional[list] = None  # per document: (index of paragraph, digest) of the long ones
    counts: Counter = field(default_factory=Counter)
    bad_messages: list = field(default_factory=list)
    bytes_done: int = 0


class Cleaner:
    """Turns a :class:`RawBlock` into a :class:`CleanBlock` (thread-safe, no shared state)."""

    def __init__(self, json_key: str, unicode_form: Optional[str], document_filter: DocumentFilter,
                 paragraphs: bool, min_paragraph_chars: int, skip_bad_lines: bool) -> None:
        self.json_key = json_key
        self.unicode_form = unicode_form
        self.filter = document_filter
        self.paragraphs = paragraphs
        self.min_paragraph_chars = min_paragraph_chars
        self.skip_bad_lines = skip_bad_lines

    def _bad(self, out: CleanBlock, where: str, message: str) -> None:
        if not self.skip_bad_lines:
            raise PreprocessError(f"{where}: {message} (use --skip-bad-lines to skip such lines)")
        out.counts["bad_lines"] += 1
        if len(out.bad_messages) < _MAX_BAD_MESSAGES:
            out.bad_messages.append(f"{where}: {message}")

    def _documents(self, block: RawBlock, out: CleanBlock) -> Iterator[tuple[str, str]]:
        """(where, text) of each document of the block; bad ones reported."""
        if not block.jsonl:
            for where, raw in block.docs:
                try:
                    yield where, raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    self._bad(out, where, f"not valid UTF-8 at byte {e.start}")
            return
        try:
            lines = block.jsonl.decode("utf-8").split("\n")
        except UnicodeDecodeError:  # some line is not UTF-8: every line by the general rules
            yield from self._parsed(json_lines(block.jsonl, block.source, block.first_line), out)
            return
        if block.jsonl.endswith(b"\n"):
            lines.pop()
        # The common line, a JSON object whose key is a string with nothing around the object
        # but JSON whitespace, goes through json.loads's own scanner without json.loads's
        # per-call checks (a fifth of json.loads's time on a short line); any other line (blank,
        # malformed, not an object, leading whitespace, ...) by the general rules on its own.
        key, source, first = self.json_key, block.source, block.first_line
        for i, line in enumerate(lines):
            try:
                obj, end = _scan_json(line, 0)
                plain = end == len(line) or not line[end:].strip(_JSON_SPACE)
            except (StopIteration, ValueError):
                plain = False
            if plain and type(obj) is dict:
                text = obj.get(key)
                if type(text) is str:
                    yield f"{source}:{first + i}", text
                    continue
            yield from self._parsed(json_lines(line.encode("utf-8"), source, first + i), out)

    def _parsed(self, parsed, out: CleanBlock) -> Iterator[tuple[str, str]]:
        """(where, text) of the documents among ``json_lines``' results; bad ones reported."""
        for _, where, obj, problem in parsed:
            if problem is not None:
                self._bad(out, where, problem)
                continue
            if obj is BLANK_LINE:
                out.counts["blank_lines"] += 1
                continue
            if not isinstance(obj, dict):
                self._bad(out, where, f"expected a JSON object, got {type(obj).__name__}")
            elif self.json_key not in obj:
                self._bad(out, where, f"missing key {self.json_key!r}")
            elif not isinstance(obj[self.json_key], str):
                self._bad(out, where, f"key {self.json_key!r} is {type(obj[self.json_key]).__name__}, not a "
                                      f"string (preparation options need one text per document)")
            else:
                yield where, obj[self.json_key]

    def __call__(self, block: RawBlock) -> CleanBlock:
        out = CleanBlock(bytes_done=block.bytes_done)
        counts = out.counts
        form = self.unicode_form
        reason_of = self.filter.reason
        wheres, texts, datas = out.wheres, out.texts, out.data
        documents = characters = 0
        # Per document, so every count and message stays in input order; the loop holds
        # only what each document needs.
        for where, text in self._documents(block, out):
            if form:
                normalized = normalize_text(text, form)
            else:
                normalized = text
            try:
                data = normalized.encode("utf-8")
            except UnicodeEncodeError as e:  # a lone surrogate from a JSON escape
                self._bad(out, where, f"text cannot be encoded as UTF-8 ({e.reason})")
                continue
            documents += 1
            characters += len(text)
            reason = reason_of(normalized, data)
            if reason is not None:
                counts["dropped_" + reason] += 1
                continue
            wheres.append(where)
            texts.append(normalized)
            datas.append(data)
        counts["documents_in"] += documents
        counts["characters_in"] += characters
        out.digests = digests_array(digests_of(datas, b"document"))
        if self.paragraphs:
            self._split_paragraphs(out)
        return out

    def _split_paragraphs(self, out: CleanBlock) -> None:
        out.paragraphs = [PARAGRAPH_BREAK.split(text) for text in out.texts]
        long = [[i for i, p in enumerate(parts) if len(p) >= self.min_paragraph_chars] for parts in out.paragraphs]
        found = iter(digests_of([parts[i].encode("utf-8") for parts, kept in zip(out.paragraphs, long) for i in kept],
                                b"paragraph"))
        out.paragraph_digests = [[(i, next(found)) for i in kept] for kept in long]
