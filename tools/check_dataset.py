#!/usr/bin/env python3
"""Check Megatron .bin/.idx datasets and print their statistics.

    python tools/check_dataset.py PREFIX [PREFIX ...] [--vocab-size N | --tokenizer-type T --tokenizer-model M] [--deep]

For every prefix: header, dtype, counts against the .idx size, each pointer against the
lengths before it (offset errors), the .bin size, and the document index (from 0,
non-decreasing, ending at the sequence count). When the dataset has a manifest
(PREFIX.manifest.json, written by our builder) its counts, sizes and .idx checksum are
compared too, which catches an .idx and .bin from different runs; --deep re-reads the
.bin and compares its checksum and token range (a .bin changed in place). --vocab-size
(or a tokenizer) reports token ids outside the vocabulary: the largest id is the manifest's
(the builder's count), so a .bin changed in place after it was written needs --deep for
its ids to be read again. Stale temporaries of an interrupted run of the same prefix are
removed.

Prints one markdown row per good dataset, notes on what could not be checked, and one
line naming the file and the first inconsistency per bad one. Exit status: 0 all good,
1 a dataset is bad or missing, 2 bad flags or tokenizer.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), os.path.pardir)))

from megatron_ext.data.indexed_dataset import (  # noqa: E402
    STATS_HEADER,
    IndexedDatasetError,
    check_dataset,
    find_temporaries,
    remove_stale_temporaries,
)


def _prefix(arg: str) -> str:
    """Accept PREFIX, PREFIX.bin or PREFIX.idx."""
    return arg[:-4] if arg.endswith((".bin", ".idx")) else arg


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("prefixes", nargs="+", metavar="PREFIX", help="dataset path prefix (PREFIX.bin / PREFIX.idx)")
    parser.add_argument("--vocab-size", type=int, default=None,
                        help="report token ids outside [0, N) (the model's vocabulary); the largest id is "
                             "the manifest's: with --deep the .bin is read again")
    parser.add_argument("--tokenizer-type", default=None, help="take the vocabulary size from this tokenizer ...")
    parser.add_argument("--tokenizer-model", default=None, help="... and its model file or directory")
    parser.add_argument("--legacy-tokenizer", action="store_true", help="as in tools/preprocess_data.py")
    parser.add_argument("--deep", action="store_true",
                        help="re-read the .bin: its checksum and token range against the manifest, or computed "
                             "(and kept in a manifest) when there is none")
    return parser


def _vocab_size(args, parser) -> int | None:
    if args.vocab_size is not None:
        if args.tokenizer_type or args.tokenizer_model:
            parser.error("--vocab-size and --tokenizer-type/--tokenizer-model are alternatives: give one")
        if args.vocab_size < 1:
            parser.error(f"--vocab-size must be positive, got {args.vocab_size}")
        return args.vocab_size
    if args.tokenizer_type is None and args.tokenizer_model is None:
        return None
    if not (args.tokenizer_type and args.tokenizer_model):
        parser.error("--tokenizer-type and --tokenizer-model go together")
    from megatron_ext.data.tokenizers import TokenizerError, build_tokenizer

    try:
        return build_tokenizer(args.tokenizer_type, args.tokenizer_model, legacy=args.legacy_tokenizer).vocab_size
    except (TokenizerError, ValueError) as e:
        parser.exit(2, f"{parser.prog}: error: {e}\n")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    vocab_size = _vocab_size(args, parser)
    failures = 0
    header_printed = False
    for arg in args.prefixes:
        prefix = _prefix(arg)
        for path in remove_stale_temporaries(prefix):
            print(f"note: removed {path}, a temporary left by an interrupted run", file=sys.stderr)
        for path in find_temporaries(prefix)[1]:
            print(f"note: {path} is being written by a running process", file=sys.stderr)
        try:
            stats = check_dataset(prefix, vocab_size=vocab_size, deep=args.deep)
        except (IndexedDatasetError, OSError) as e:
            print(f"error: {e}", file=sys.stderr)
            failures += 1
            continue
        if not header_printed:
            print(STATS_HEADER)
            header_printed = True
        print(stats.row(), flush=True)
        for note in stats.notes:
            print(f"note: {note}", file=sys.stderr)
    if failures:
        print(f"{failures} of {len(args.prefixes)} datasets failed the check", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
