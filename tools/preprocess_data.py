#!/usr/bin/env python3
"""Tokenize JSON lines (or plain-text files) into Megatron .bin/.idx datasets.

Same flags and same output bytes as Megatron-LM's tools/preprocess_data.py; the work is
done by megatron_ext.data.preprocess (see its docstring for the exact rules).
"""
from __future__ import annotations

import argparse
import os
import signal
import sys

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), os.path.pardir)))

from megatron_ext.data.preprocess import (  # noqa: E402
    BACKENDS,
    EmptyInputError,
    PreprocessConfig,
    PreprocessError,
    preprocess,
)
from megatron_ext.data.tokenizers import TOKENIZER_TYPES, TokenizerError  # noqa: E402


def _available_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=(
            "Inputs: *.jsonl / *.json (and the same with .gz) are JSON lines, one document per line; "
            "a key's value is a string or a list of pre-split sentences. *.txt (and *.txt.gz) files "
            "are plain text, one document per file (the whole file) stored under the single "
            "--json-keys key. Blank lines are ignored.\n\n"
            "Output: <output-prefix>_<key>_document.bin/.idx for each key, byte-identical to "
            "Megatron-LM. A document with no tokens is kept as an empty document entry, as "
            "Megatron-LM does, and counted as 'empty' in the summary. Nothing is written at the "
            "output paths unless the run completes."
        ),
    )
    group = parser.add_argument_group("input data")
    group.add_argument("--input", nargs="+", required=True,
                       help="Input files or glob patterns (each glob is sorted; quote it to let "
                            "this tool expand it).")
    group.add_argument("--json-keys", nargs="+", default=["text"],
                       help="Space-separated keys to extract from each JSON line (default: text).")
    group.add_argument("--split-sentences", action="store_true",
                       help="Not supported: give each key a JSON list of sentences instead "
                            "(tokenized per sentence, as Megatron-LM does).")
    group.add_argument("--skip-bad-lines", action="store_true",
                       help="Count and skip malformed lines instead of stopping at the first one.")
    group.add_argument("--allow-empty", action="store_true",
                       help="Write an empty dataset when the input has no tokens (refused by default, exit 2).")

    group = parser.add_argument_group("tokenizer")
    group.add_argument("--tokenizer-type", required=True, choices=TOKENIZER_TYPES,
                       help="Llama2Tokenizer prepends BOS to every document (legacy Megatron-LM, as "
                            "MaskLLM); SentencePieceTokenizer / GPTSentencePieceTokenizer add none.")
    group.add_argument("--tokenizer-model", required=True,
                       help="tokenizer.model (SentencePiece) or tokenizer.json (HuggingFace), or a "
                            "directory holding it.")
    group.add_argument("--legacy-tokenizer", action="store_true",
                       help="SentencePieceTokenizer only: use megatron/training's wrapper (<CLS> <SEP> "
                            "<EOD> <MASK> <PAD> special tokens, eod = <EOD>) instead of megatron-core's.")
    group.add_argument("--append-eod", action="store_true",
                       help="Append the end-of-document token to every document that has tokens.")

    group = parser.add_argument_group("output data")
    group.add_argument("--output-prefix", required=True,
                       help="Path prefix of the outputs (its directory must exist).")

    group = parser.add_argument_group("runtime")
    group.add_argument("--workers", type=int, default=_available_cpus(),
                       help="Tokenizer workers (default: the CPUs available to this process).")
    group.add_argument("--worker-backend", choices=BACKENDS, default="thread",
                       help="Run the workers as threads of this process (default: the tokenizers "
                            "encode without the GIL, and it needs half the memory) or as forked "
                            "processes (about as fast).")
    group.add_argument("--partitions", type=int, default=1,
                       help="Megatron-LM's document order for N partitions: lines are dealt "
                            "round-robin to N partitions which are then concatenated. All workers "
                            "serve all partitions.")
    group.add_argument("--keep-sequential-samples", action="store_true",
                       help="With --partitions: contiguous partitions, i.e. the input order.")
    group.add_argument("--log-interval", type=int, default=1000,
                       help="Print progress every this many documents.")
    return parser


def preprocess_config(args) -> PreprocessConfig:
    """The library configuration for parsed flags (tools/prepare_dataset.py shares them)."""
    return PreprocessConfig(
        inputs=args.input,
        output_prefix=args.output_prefix,
        tokenizer_type=args.tokenizer_type,
        tokenizer_model=args.tokenizer_model,
        json_keys=tuple(args.json_keys),
        append_eod=args.append_eod,
        workers=args.workers,
        partitions=args.partitions,
        keep_sequential_samples=args.keep_sequential_samples,
        log_interval=args.log_interval,
        skip_bad_lines=args.skip_bad_lines,
        legacy_tokenizer=args.legacy_tokenizer,
        backend=args.worker_backend,
        allow_empty=args.allow_empty,
    )


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.split_sentences:
        print("error: --split-sentences is not supported; give each key a JSON list of sentences "
              "(each is tokenized separately, as Megatron-LM does after splitting)", file=sys.stderr)
        return 2
    config = preprocess_config(args)
    # A terminated run unwinds like an interrupted one, so the temporaries are removed.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    try:
        preprocess(config)
    except EmptyInputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (PreprocessError, TokenizerError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted; no output written", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
