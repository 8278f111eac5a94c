#!/usr/bin/env python3
"""Prepare a large corpus for Megatron: normalize, filter, deduplicate, hold out a validation
split, cut into shards that later runs extend, and write stats; then tokenize into .bin/.idx
with the same tokenizer, workers and builder as tools/preprocess_data.py.

With none of the preparation flags below, the output is byte-identical to
tools/preprocess_data.py's (the run is the same code). The work is done by
megatron_ext.data.prepare (see its modules' docstrings for the exact rules).

Standard output holds only the blend strings for --data-path, one line per split (train,
then val; one line without a split), so BLEND=$(python tools/prepare_dataset.py ...)
captures them; the progress, the summary and errors go to standard error.
"""
from __future__ import annotations

import argparse
import os
import signal
import sys

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), os.path.pardir)))
sys.path.insert(0, os.path.abspath(os.path.dirname(__file__)))

from preprocess_data import build_parser as preprocess_parser, preprocess_config  # noqa: E402

from megatron_ext.data.prepare import PrepareConfig, prepare  # noqa: E402
from megatron_ext.data.prepare.config import (  # noqa: E402
    DEDUP_EXPECTED_ITEMS,
    DEDUP_FALSE_POSITIVE_RATE,
    MIN_PARAGRAPH_CHARS,
)
from megatron_ext.data.prepare.dedup import DEDUP_MODES, TABLES  # noqa: E402
from megatron_ext.data.prepare.inputs import TEXT_DOCS_PER  # noqa: E402
from megatron_ext.data.prepare.normalize import UNICODE_FORMS  # noqa: E402


def build_parser():
    parser = preprocess_parser()
    parser.description = __doc__
    parser.epilog = (
        "Inputs: files, directories (their *.jsonl, *.json, *.txt, also .gz / .zst, recursively) and globs. "
        "Outputs: <prefix>_text_document, or <prefix>_train_text_document and <prefix>_val_text_document "
        "with a split, or numbered shards <prefix>[_train|_val]_00000_text_document ... with "
        "--tokens-per-shard; <prefix>_stats.json beside them. Standard output: the blend string for "
        "--data-path of each split, one line each (train, then val). An input with no tokens, or a split "
        "left empty, is refused (exit 2) unless --allow-empty; nothing is written then."
    )
    # Progress: a line rewritten in place on a terminal; --log-interval N adds a log line every N documents.
    parser.set_defaults(log_interval=None)
    for action in parser._actions:
        if action.dest == "log_interval":
            action.help = ("Print a progress line every this many input documents (default: none; on a terminal "
                           "a progress line is rewritten in place).")
    g = parser.add_argument_group("preparation: cleaning")
    g.add_argument("--text-docs-per", choices=TEXT_DOCS_PER, default="file",
                   help="Plain-text inputs: one document per file (default), per paragraph (text between blank "
                        "lines) or per non-blank line.")
    g.add_argument("--normalize", action="store_true",
                   help="Unicode normalization (--unicode-form), line breaks to \\n, control characters (Cc but tab "
                        "and newline), U+FEFF and U+200B removed, exotic spaces to ' ', trailing spaces of lines "
                        "removed, blank-line runs to one blank line, the document stripped. Indentation is kept.")
    g.add_argument("--unicode-form", choices=UNICODE_FORMS, default="NFC",
                   help="With --normalize: NFC (default) or NFKC (also folds ligatures, full-width forms).")
    g.add_argument("--min-chars", type=int, default=0, help="Drop documents with fewer characters (after cleaning).")
    g.add_argument("--min-words", type=int, default=0, help="Drop documents with fewer whitespace-separated words.")
    g.add_argument("--max-non-alnum-fraction", type=float, default=1.0,
                   help="Drop documents where more than this fraction of the non-whitespace characters are neither "
                        "letters nor digits (default 1: off).")

    g = parser.add_argument_group("preparation: deduplication")
    g.add_argument("--dedup", choices=DEDUP_MODES, default=None,
                   help="exact: drop documents identical (after cleaning) to an earlier one. paragraph: also remove "
                        "every paragraph of at least --min-paragraph-chars already seen from later documents. The "
                        "first occurrence across all inputs, both splits, is kept.")
    g.add_argument("--min-paragraph-chars", type=int, default=MIN_PARAGRAPH_CHARS,
                   help=f"--dedup paragraph: shorter paragraphs are never removed (default {MIN_PARAGRAPH_CHARS}).")
    g.add_argument("--dedup-table", choices=TABLES, default="memory",
                   help="memory: exact 64-bit table, 16-32 MB per million documents or paragraphs (48 while it "
                        "doubles); bloom: fixed "
                        "size for --dedup-expected-items at --dedup-false-positive-rate (3.6 MB per million at 1e-6); "
                        "disk: SQLite file, 32 MB of memory whatever the corpus, slower.")
    g.add_argument("--dedup-expected-items", type=int, default=DEDUP_EXPECTED_ITEMS,
                   help=f"bloom: entries (documents, and paragraphs with --dedup paragraph) the filter is sized "
                        f"for (default {DEDUP_EXPECTED_ITEMS:,}); a run that passes it stops with an error, as the "
                        f"filter would then drop unique text.")
    g.add_argument("--dedup-false-positive-rate", type=float, default=DEDUP_FALSE_POSITIVE_RATE,
                   help=f"bloom: the false-positive rate at --dedup-expected-items entries "
                        f"(default {DEDUP_FALSE_POSITIVE_RATE:g}).")
    g.add_argument("--dedup-dir", default=None,
                   help="disk: directory of the working table (default: beside the output); the table kept for "
                        "--append is copied beside the output at the end.")

    g = parser.add_argument_group("preparation: split and shards")
    g.add_argument("--val-fraction", type=float, default=None,
                   help="Hold out this fraction of the documents (chosen by a hash of each document and --seed: "
                        "stable on re-runs and when files are added).")
    g.add_argument("--val-docs", type=int, default=None,
                   help="Hold out this many documents (the smallest hashes; one extra pass over the input).")
    g.add_argument("--seed", type=int, default=1234, help="Seed of the split hash (default 1234).")
    g.add_argument("--tokens-per-shard", type=int, default=None,
                   help="Cut each split into numbered shards of about this many tokens (whole documents).")
    g.add_argument("--append", action="store_true",
                   help="Add the inputs to an earlier sharded run: new shards after its last one, stats updated, "
                        "deduplicated against it; old shards untouched. Options must match the earlier run's.")
    return parser


def prepare_config(args) -> PrepareConfig:
    log_interval = 1000 if args.log_interval is None else args.log_interval  # preprocess_data's default
    shared = argparse.Namespace(**{**vars(args), "log_interval": log_interval})
    return PrepareConfig(
        preprocess=preprocess_config(shared), normalize=args.normalize, unicode_form=args.unicode_form,
        min_chars=args.min_chars, min_words=args.min_words, max_non_alnum_fraction=args.max_non_alnum_fraction,
        dedup=args.dedup, min_paragraph_chars=args.min_paragraph_chars, dedup_table=args.dedup_table,
        dedup_expected_items=args.dedup_expected_items, dedup_false_positive_rate=args.dedup_false_positive_rate,
        dedup_dir=args.dedup_dir, val_fraction=args.val_fraction, val_docs=args.val_docs, seed=args.seed,
        tokens_per_shard=args.tokens_per_shard, append=args.append, text_docs_per=args.text_docs_per,
        log_interval=args.log_interval,
    )


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.split_sentences:
        print("error: --split-sentences is not supported; give each key a JSON list of sentences", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    try:
        result = prepare(prepare_config(args))
    except ValueError as e:  # PrepareError, PreprocessError, TokenizerError: bad flags or input
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a file-system failure during the run (disk full, ...): nothing was committed
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted; no output written", file=sys.stderr)
        return 130
    for blend in result.blends.values():  # the only lines on stdout
        print(blend, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
