"""Document filters: each drops a document for one named reason, counted in the stats.

Checked in this order, the first that applies is the reason:

* ``empty``: nothing left (after ``--normalize``, or only whitespace);
* ``min_chars``: fewer than ``--min-chars`` characters;
* ``min_words``: fewer than ``--min-words`` words (runs of non-whitespace);
* ``max_non_alnum_fraction``: more than ``--max-non-alnum-fraction`` of the non-whitespace
  characters are neither letters nor digits (markup, tables of numbers' punctuation, binary
  noise).
"""
from __future__ import annotations

import re
import string
from dataclasses import dataclass
from typing import Optional

REASONS = ("empty", "min_chars", "min_words", "max_non_alnum_fraction")

_WS_BYTES = string.whitespace.encode()
_ALNUM_WS_BYTES = (string.ascii_letters + string.digits + string.whitespace).encode()
_NOT_WS = re.compile(r"\S")
_NOT_ALNUM_NOT_WS = re.compile(r"[^\w\s]|_")


@dataclass(frozen=True)
class DocumentFilter:
    min_chars: int = 0
    min_words: int = 0
    max_non_alnum_fraction: float = 1.0

    @property
    def active(self) -> bool:
        return self.min_chars > 0 or self.min_words > 0 or self.max_non_alnum_fraction < 1.0

    def reason(self, text: str, data: bytes) -> Optional[str]:
        """Why ``text`` (whose UTF-8 is ``data``) is dropped, or None to keep it."""
        if not text or text.isspace():
            return "empty"
        if len(text) < self.min_chars:
            return "min_chars"
        # split with a limit stops counting once there are enough words
        if self.min_words > 0 and len(text.split(None, self.min_words)) < self.min_words:
            return "min_words"
        if self.max_non_alnum_fraction < 1.0 and self.non_alnum_fraction(text, data) > self.max_non_alnum_fraction:
            return "max_non_alnum_fraction"
        return None

    @staticmethod
    def non_alnum_fraction(text: str, data: bytes) -> float:
        if len(data) == len(text):  # ASCII: count with bytes.translate, at C speed
            non_ws = len(data.translate(None, _WS_BYTES))
            other = len(data.translate(None, _ALNUM_WS_BYTES))
        else:
            non_ws = len(_NOT_WS.findall(text))
            other = len(_NOT_ALNUM_NOT_WS.findall(text))
        return other / non_ws if non_ws else 0.0
