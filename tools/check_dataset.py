#!/usr/bin/env python3
"""Check Megatron .bin/.idx datasets and print their statistics.

    python tools/check_dataset.py PREFIX [PREFIX ...]

For every prefix: header, dtype, counts against the .idx size, each pointer against the
lengths before it (offset errors), the .bin size, and the document index (from 0,
non-decreasing, ending at the sequence count). Prints one markdown row per good dataset
and one line naming the file and the first inconsistency per bad one; exits 1 when any
dataset is bad or missing.
"""
from __future__ import annotations

import argparse
import sys

from megatron_ext.data.indexed_dataset import STATS_HEADER, IndexedDatasetError, check_dataset


def _prefix(arg: str) -> str:
    """Accept PREFIX, PREFIX.bin or PREFIX.idx."""
    return arg[:-4] if arg.endswith((".bin", ".idx")) else arg


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("prefixes", nargs="+", metavar="PREFIX", help="dataset path prefix (PREFIX.bin / PREFIX.idx)")
    args = parser.parse_args(argv)
    failures = 0
    header_printed = False
    for arg in args.prefixes:
        try:
            stats = check_dataset(_prefix(arg))
        except (IndexedDatasetError, OSError) as e:
            print(f"error: {e}", file=sys.stderr)
            failures += 1
            continue
        if not header_printed:
            print(STATS_HEADER)
            header_printed = True
        print(stats.row())
    if failures:
        print(f"{failures} of {len(args.prefixes)} datasets failed the check", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
