#!/usr/bin/env python3
"""Export a sparse checkpoint: hard masks baked into the weights, logits dropped.

    python tools/export_sparse.py --load MASK_CKPT --save OUT --format {hf,masks,megatron} [--dtype fp16]

--load is our checkpoint with ``<layer>.mask_logits`` (learned; argmax) and/or
``<layer>.hard_mask`` (one-shot) per masked linear. Formats:

  hf        Hugging Face directory (fp16 unless --dtype), masks baked into the weights
  megatron  our checkpoint at the same TP, masks baked in, ``<layer>.hard_mask`` kept
  masks     OUT/masks.npz: each group's candidate index in ceil(log2 C) bits, bit-packed
            (0.75 bits per parameter at 2:4); prints the bits per parameter

N:M comes from the checkpoint (checkpoint.json) or the logits' shape unless --N/--M say.
"""
from __future__ import annotations

import argparse
import sys

from megatron_ext.cli import DTYPE_NAMES


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--load", required=True, help="our checkpoint with mask_logits and/or hard_mask entries")
    p.add_argument("--save", required=True, help="output directory")
    p.add_argument("--format", required=True, choices=("hf", "masks", "megatron"))
    p.add_argument("--dtype", choices=DTYPE_NAMES, default=None,
                   help="weight dtype of the output (hf default fp16, megatron default: unchanged)")
    p.add_argument("--N", type=int, default=None, help="kept weights per group (default: from the checkpoint)")
    p.add_argument("--M", type=int, default=None, help="group size (default: from the checkpoint)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from megatron_ext.errors import MegatronExtError
    from megatron_ext.sparsity.export import export_sparse

    try:
        result = export_sparse(args.load, args.save, args.format, N=args.N, M=args.M, dtype=args.dtype,
                               overwrite=args.overwrite)
    except (MegatronExtError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"exported {result.layers} masked linears ({result.N}:{result.M}) as {result.format} to {result.path} "
          "(our layers: fused qkv and gate/up count once; tools/check_sparsity.py counts Hugging Face's "
          "q, k, v, gate and up separately)")
    if result.pack is not None:
        p = result.pack
        print(f"packed masks: {p.params} weights in {p.bytes} bytes = {p.bits_per_param:.4f} bits per parameter "
              f"(a plain bitmap needs 1)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
