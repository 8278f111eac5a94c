"""Text normalization for ``--normalize``: the same document always cleans to the same text,
so deduplication and the train/validation split see through cosmetic differences.

In this order:

1. Unicode normalization: NFC (``--unicode-form NFC``, the default) or NFKC (also folds
   compatibility characters: ligatures, full-width forms, superscripts);
2. line breaks ``\\r\\n``, ``\\r``, U+0085, U+2028 and U+2029 become ``\\n``;
3. control characters (Unicode category Cc except tab and newline), the byte order mark
   U+FEFF and the zero-width space U+200B are removed;
4. other spaces (vertical tab, form feed, no-break and typographic spaces U+00A0,
   U+1680, U+2000-U+200A, U+202F, U+205F, U+3000) become a plain space;
5. spaces and tabs at the end of a line are removed (indentation is kept: code stays code);
6. runs of blank lines become one blank line;
7. leading and trailing whitespace of the document is removed.

Pure-ASCII text skips the Unicode steps, and text with nothing to clean costs a few scans.
One line of printable characters (``str.isprintable``: no control or format character, no
line or paragraph separator, no space but U+0020), a short document's usual shape, has
nothing for steps 2-6 to do (every character they change is unprintable) and costs one scan.
"""
from __future__ import annotations

import re
import unicodedata

UNICODE_FORMS = ("NFC", "NFKC")

_UNICODE_BREAKS = re.compile("[\u0085\u2028\u2029]")
_DROP = re.compile("[\x00-\x08\x0e-\x1f\x7f-\x84\x86-\x9f\ufeff\u200b]")
_ASCII_KEPT = bytes(range(0x20, 0x7f)) + b"\t\n\r"  # the ASCII that steps 3 and 4 leave as it is
_SPACES = re.compile("[\x0b\x0c\xa0\u1680\u2000-\u200a\u202f\u205f\u3000]")


def normalize_text(text: str, form: str = "NFC") -> str:
    """``text`` cleaned by the rules of the module docstring.

    Each step first checks, at C speed, whether it has anything to do: most documents
    need few of them, and a regex substitution costs far more than a search.
    """
    if text.isprintable():  # one line, no control character, no space but ' ': only steps 1 and 7 can apply
        if text.isascii():
            return text.strip()
        normalized = unicodedata.normalize(form, text)
        if normalized.isprintable():
            return normalized.strip()
    if "\r" in text:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    if text.isascii():
        if text.encode("ascii").translate(None, _ASCII_KEPT):  # a byte table: several times a regex's speed
            text = _DROP.sub("", text.replace("\x0b", " ").replace("\x0c", " "))
    else:
        text = unicodedata.normalize(form, text)
        text = _UNICODE_BREAKS.sub("\n", text)
        text = _SPACES.sub(" ", text)
        text = _DROP.sub("", text)
    if " \n" in text or "\t\n" in text:
        text = "\n".join([line.rstrip(" \t") for line in text.split("\n")])
    while "\n\n\n" in text:
        text = text.replace("\n\n\n", "\n\n")
    return text.strip()
