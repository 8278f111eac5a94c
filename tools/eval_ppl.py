#!/usr/bin/env python3
"""WikiText-2-style perplexity of a checkpoint (ours or a Hugging Face directory).

    python tools/eval_ppl.py --load CKPT --text-file wiki.test.raw --seq-length 4096
    torchrun --nproc_per_node 4 tools/eval_ppl.py --load CKPT --text-file FILE \\
        --seq-length 4096 --tensor-model-parallel-size 2

The text is tokenized whole with the tokenizer that comes with the checkpoint (or
--data-path names an already tokenized .bin/.idx prefix), cut into non-overlapping
windows of --seq-length tokens, and PPL = exp(mean NLL) over every predicted token.
A checkpoint saved at another tensor-parallel size is resharded in memory. Windows
are spread over the data-parallel ranks. The last line printed is exactly
``PPL <value> tokens <count>``.
"""
from __future__ import annotations

import argparse
import sys

from megatron_ext.cli import add_model_flags, add_window_flags


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_flags(p)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--text-file", help="UTF-8 text evaluated as one document (e.g. WikiText-2 wiki.test.raw)")
    src.add_argument("--data-path", help="prefix of a tokenized Megatron .bin/.idx dataset")
    add_window_flags(p)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from megatron_ext.evaluation import evaluate, run_tool

    apply_masks = None
    if args.sparse:  # the sparsity layer only when asked for
        from megatron_ext.sparsity.export import baked_weights as apply_masks

    def work(info) -> None:
        result = evaluate(args.load, seq_length=args.seq_length, text_file=args.text_file,
                          data_path=args.data_path, micro_batch_size=args.micro_batch_size,
                          sparse=args.sparse, params_dtype=args.dtype, tokenizer_type=args.tokenizer_type,
                          max_windows=args.max_windows, apply_masks=apply_masks)
        if info.rank == 0:
            print(f"windows {result.windows} x {args.seq_length} tokens, TP={info.tp_size} DP={info.dp_size}, "
                  f"mean NLL {result.nll_sum / result.tokens:.6f}", flush=True)
            print(result.line(), flush=True)

    return run_tool(args.tensor_model_parallel_size, work)

if __name__ == "__main__":
    sys.exit(main())
