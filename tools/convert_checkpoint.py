#!/usr/bin/env python3
"""Convert LLaMA checkpoints between Hugging Face, GGUF and our megatron-core format.

    python tools/convert_checkpoint.py --source-format hf --target-format megatron \\
        --load ./Llama-2-7b-hf --save ./ckpt/llama2-7b-tp2 --target-tp 2 --dtype bf16
    python tools/convert_checkpoint.py --source-format gguf --target-format hf \\
        --load SmolLM2-135M-Instruct.Q4_1.gguf --save ./smollm2-hf
    python tools/convert_checkpoint.py --source-format megatron --target-format megatron \\
        --load ./ckpt/llama2-7b-tp2 --save ./ckpt/llama2-7b-tp4 --target-tp 4

The tokenizer files travel with the weights. GGUF weights are dequantized to fp32
unless --dtype says otherwise. Outputs are written under a temporary name and
renamed into place when complete.
"""
from __future__ import annotations

import argparse
import sys

from megatron_ext.cli import DTYPE_NAMES


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--source-format", required=True, choices=("hf", "gguf", "megatron"))
    p.add_argument("--target-format", required=True, choices=("hf", "megatron"))
    p.add_argument("--load", required=True, help="source directory (hf, megatron) or .gguf file")
    p.add_argument("--save", required=True, help="target directory")
    p.add_argument("--target-tp", type=int, default=None,
                   help="tensor-parallel size of a megatron target (default: 1, or the source's TP)")
    p.add_argument("--dtype", choices=DTYPE_NAMES, default=None,
                   help="cast floating tensors (default: keep the source dtype; fp32 for GGUF)")
    p.add_argument("--tokenizer-type", default=None,
                   help="tokenizer type recorded in a megatron target (default: inferred from the files)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing target")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from megatron_ext.errors import MegatronExtError
    from megatron_ext.checkpoint import convert_checkpoint

    if args.target_tp is not None and args.target_tp < 1:
        print(f"error: --target-tp must be >= 1, got {args.target_tp}", file=sys.stderr)
        return 2
    try:
        out = convert_checkpoint(args.source_format, args.target_format, args.load, args.save,
                                 target_tp=args.target_tp, dtype=args.dtype, overwrite=args.overwrite,
                                 tokenizer_type=args.tokenizer_type)
    except (MegatronExtError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"saved {args.target_format} checkpoint to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
