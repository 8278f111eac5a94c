#!/usr/bin/env python3
"""Merge every PREFIX.bin/PREFIX.idx pair in a directory into one dataset.

    python tools/merge_datasets.py --input DIR --output-prefix OUT

Inputs are taken in sorted order of their prefixes and appended with add_index, as
Megatron-LM's tools/merge_datasets.py does, so the output is byte-identical to it. All
inputs must share one dtype and pass the checks of tools/check_dataset.py. OUT.bin and
OUT.idx appear only once the merge is complete, then OUT.manifest.json (counts, token
range, checksums). Exit status: 0 done, 1 an input is bad or the merge failed.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), os.path.pardir)))

from megatron_ext.data.indexed_dataset import (  # noqa: E402
    IndexedDataset,
    IndexedDatasetError,
    find_dataset_prefixes,
    merge_datasets,
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--input", required=True, help="directory holding the PREFIX.bin/PREFIX.idx pairs to merge")
    parser.add_argument("--output-prefix", required=True, help="path of the merged dataset, without .bin/.idx")
    parser.add_argument("--durable", action="store_true", help="fsync the output before and after the renames")
    args = parser.parse_args(argv)
    try:
        prefixes = find_dataset_prefixes(args.input)
        if not prefixes:
            raise IndexedDatasetError(f"{args.input}: no .bin/.idx pairs to merge")
        merge_datasets(prefixes, args.output_prefix, durable=args.durable)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    ds = IndexedDataset(args.output_prefix)
    print(
        f"merged {len(prefixes)} datasets into {args.output_prefix}: {ds.document_count} documents, "
        f"{len(ds)} sequences, {ds.token_count} tokens ({ds.dtype.__name__})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
