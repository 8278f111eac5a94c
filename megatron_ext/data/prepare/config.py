"""The options of a preparation run, checked together before any work: a contradiction
raises :class:`PrepareError` naming the flags.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Optional

from megatron_ext.data.preprocess import PreprocessConfig, PreprocessError
from megatron_ext.data.prepare.dedup import DEDUP_MODES, TABLES
from megatron_ext.data.prepare.filters import DocumentFilter
from megatron_ext.data.prepare.inputs import TEXT_DOCS_PER
from megatron_ext.data.prepare.normalize import UNICODE_FORMS


class PrepareError(PreprocessError):
    """Bad preparation options or input; the message names the flag or the file and line."""


MIN_PARAGRAPH_CHARS = 50
DEDUP_EXPECTED_ITEMS = 10_000_000
DEDUP_FALSE_POSITIVE_RATE = 1e-6
SEED = 1234


@dataclass(frozen=True)
class PrepareConfig:
    """``preprocess`` holds the tokenizer, input and output flags shared with preprocess_data.py;
    the rest are tools/prepare_dataset.py's own flags (``None``/defaults: off)."""

    preprocess: PreprocessConfig
    normalize: bool = False
    unicode_form: str = "NFC"
    min_chars: int = 0
    min_words: int = 0
    max_non_alnum_fraction: float = 1.0
    dedup: Optional[str] = None
    min_paragraph_chars: int = MIN_PARAGRAPH_CHARS
    dedup_table: str = "memory"
    dedup_expected_items: int = DEDUP_EXPECTED_ITEMS
    dedup_false_positive_rate: float = DEDUP_FALSE_POSITIVE_RATE
    dedup_dir: Optional[str] = None
    val_fraction: Optional[float] = None
    val_docs: Optional[int] = None
    seed: int = SEED
    tokens_per_shard: Optional[int] = None
    append: bool = False
    text_docs_per: str = "file"
    log_interval: Optional[int] = None  # a log line every this many input documents (None: none)

    @property
    def document_filter(self) -> DocumentFilter:
        return DocumentFilter(self.min_chars, self.min_words, self.max_non_alnum_fraction)

    @property
    def preparing(self) -> bool:
        """Whether any preparation option is on; if not, the run is exactly preprocess_data.py's."""
        defaults = PrepareConfig(self.preprocess)
        # Any of them, even one that needs another to mean something (it is then refused by check).
        return any(getattr(self, f.name) != getattr(defaults, f.name) for f in fields(self)
                   if f.name not in ("preprocess", "log_interval"))

    @property
    def has_val(self) -> bool:
        return self.val_fraction is not None or self.val_docs is not None

    def options(self) -> dict:
        """What changes the output, recorded in the stats and compared on --append."""
        p = self.preprocess
        bloom = {"dedup_expected_items": self.dedup_expected_items,
                 "dedup_false_positive_rate": self.dedup_false_positive_rate} if self.dedup_table == "bloom" else {}
        return {**bloom,"json_key": p.json_keys[0], "append_eod": p.append_eod, "normalize": self.normalize,
                "unicode_form": self.unicode_form if self.normalize else None, "min_chars": self.min_chars,
                "min_words": self.min_words, "max_non_alnum_fraction": self.max_non_alnum_fraction,
                "dedup": self.dedup,
                "min_paragraph_chars": self.min_paragraph_chars if self.dedup == "paragraph" else None,
                "dedup_table": self.dedup_table if self.dedup else None, "val_fraction": self.val_fraction,
                "val_docs": self.val_docs, "seed": self.seed, "tokens_per_shard": self.tokens_per_shard,
                "text_docs_per": self.text_docs_per}

    def check(self) -> None:
        p = self.preprocess
        if len(p.json_keys) != 1:
            raise PrepareError(f"--json-keys {list(p.json_keys)}: preparation options work on one text key")
        if p.partitions != 1 or p.keep_sequential_samples:
            raise PrepareError("--partitions / --keep-sequential-samples: not available with preparation options "
                               "(documents keep the input order)")
        if p.backend != "thread":
            raise PrepareError("--worker-backend process: preparation options run the workers as threads")
        if self.unicode_form not in UNICODE_FORMS:
            raise PrepareError(f"--unicode-form {self.unicode_form!r}: choose one of {', '.join(UNICODE_FORMS)}")
        if self.unicode_form != "NFC" and not self.normalize:
            raise PrepareError("--unicode-form needs --normalize")
        if self.min_chars < 0 or self.min_words < 0:
            raise PrepareError("--min-chars / --min-words must be >= 0")
        if not 0.0 <= self.max_non_alnum_fraction <= 1.0:
            raise PrepareError(f"--max-non-alnum-fraction {self.max_non_alnum_fraction}: must be in [0, 1]")
        if self.dedup is not None and self.dedup not in DEDUP_MODES:
            raise PrepareError(f"--dedup {self.dedup!r}: choose one of {', '.join(DEDUP_MODES)}")
        if self.dedup_table not in TABLES:
            raise PrepareError(f"--dedup-table {self.dedup_table!r}: choose one of {', '.join(TABLES)}")
        # A flag that only means something in a mode is refused without it, not ignored.
        if self.dedup is None and (self.dedup_table != "memory" or self.dedup_dir):
            raise PrepareError("--dedup-table / --dedup-dir need --dedup exact or --dedup paragraph")
        if self.dedup_dir is not None and self.dedup_table != "disk":
            raise PrepareError(f"--dedup-dir {self.dedup_dir}: only the disk table has a working file; "
                               f"add --dedup-table disk")
        if ((self.dedup_expected_items != DEDUP_EXPECTED_ITEMS
             or self.dedup_false_positive_rate != DEDUP_FALSE_POSITIVE_RATE) and self.dedup_table != "bloom"):
            raise PrepareError("--dedup-expected-items / --dedup-false-positive-rate size the Bloom filter: "
                               "add --dedup-table bloom (the memory and disk tables grow as needed)")
        if self.dedup_expected_items < 1 or not 0.0 < self.dedup_false_positive_rate < 1.0:
            raise PrepareError("--dedup-expected-items must be >= 1 and --dedup-false-positive-rate in (0, 1)")
        if self.min_paragraph_chars != MIN_PARAGRAPH_CHARS and self.dedup != "paragraph":
            raise PrepareError(f"--min-paragraph-chars {self.min_paragraph_chars}: only used by --dedup paragraph")
        if self.min_paragraph_chars < 1:
            raise PrepareError(f"--min-paragraph-chars {self.min_paragraph_chars}: must be at least 1")
        if self.log_interval is not None and self.log_interval < 1:
            raise PrepareError(f"--log-interval {self.log_interval}: must be at least 1")
        if self.seed != SEED and not self.has_val:
            raise PrepareError(f"--seed {self.seed}: only used by the split; add --val-fraction or --val-docs")
        if self.val_fraction is not None and self.val_docs is not None:
            raise PrepareError("--val-fraction and --val-docs contradict each other: give one")
        if self.val_fraction is not None and not 0.0 < self.val_fraction < 1.0:
            raise PrepareError(f"--val-fraction {self.val_fraction}: must be between 0 and 1 (exclusive)")
        if self.val_docs is not None and self.val_docs < 1:
            raise PrepareError(f"--val-docs {self.val_docs}: must be at least 1")
        if self.val_docs is not None and self.append:
            raise PrepareError("--val-docs with --append: a fixed count cannot stay stable as files are added; "
                               "use --val-fraction")
        if self.tokens_per_shard is not None and self.tokens_per_shard < 1:
            raise PrepareError(f"--tokens-per-shard {self.tokens_per_shard}: must be at least 1")
        if self.append and self.tokens_per_shard is None:
            raise PrepareError("--append needs --tokens-per-shard: only sharded outputs grow without rewriting")
        if self.text_docs_per not in TEXT_DOCS_PER:
            raise PrepareError(f"--text-docs-per {self.text_docs_per!r}: choose one of {', '.join(TEXT_DOCS_PER)}")
