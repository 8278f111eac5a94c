#!/usr/bin/env python3
"""One-shot N:M pruning (magnitude, Wanda, SparseGPT) of a LLaMA checkpoint, at any TP.

    python tools/prune_oneshot.py --load CKPT --method sparsegpt --N 2 --M 4 \\
        --calib-data PREFIX_OR_TEXT --hessian-samples 128 --seq-length 2048 --save OUT [--update-weight]
    torchrun --nproc_per_node 4 tools/prune_oneshot.py --tensor-model-parallel-size 4 ...

--load is one of our checkpoints (resharded in memory when saved at another TP) or a
Hugging Face directory. --calib-data is a tokenized .bin/.idx prefix or a UTF-8 text
file tokenized with the checkpoint's tokenizer; --hessian-samples random (seeded)
windows of --seq-length tokens calibrate Wanda and SparseGPT, layer by layer on the
outputs of the already pruned layers. The output is our checkpoint at the run's TP:
weights zeroed outside the mask (or OBS-updated with --update-weight) plus a
``<layer>.hard_mask`` entry per masked linear, the prior for mask learning.
"""
from __future__ import annotations

import argparse
import sys

from megatron_ext.cli import DTYPE_NAMES, add_model_flags


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_flags(p)
    p.add_argument("--save", required=True, help="output checkpoint directory")
    p.add_argument("--method", required=True, choices=("magnitude", "wanda", "sparsegpt"))
    p.add_argument("--N", type=int, default=2, help="weights kept per group (default 2)")
    p.add_argument("--M", type=int, default=4, help="group size along the input dimension (default 4)")
    p.add_argument("--calib-data", default=None, help="calibration data: .bin/.idx prefix or a text file")
    p.add_argument("--hessian-samples", type=int, default=128, help="calibration windows (default 128)")
    p.add_argument("--seq-length", type=int, default=2048, help="tokens per calibration window (default 2048)")
    p.add_argument("--seed", type=int, default=1234, help="seed of the window positions")
    p.add_argument("--update-weight", action="store_true",
                   help="sparsegpt: keep the OBS-compensated weights (default: original weights times the mask)")
    p.add_argument("--blocksize", type=int, default=128, help="sparsegpt column block (default 128)")
    p.add_argument("--percdamp", type=float, default=0.01, help="sparsegpt damping, fraction of mean diag(H)")
    p.add_argument("--row-hessian", choices=("full", "local"), default="full",
                   help="sparsegpt on row-parallel layers under TP: exact full Hessian (default) or the "
                        "local diagonal block (approximation, no communication)")
    p.add_argument("--no-sequential", action="store_true",
                   help="calibrate every layer on the dense model's activations instead of the pruned ones")
    p.add_argument("--save-dtype", choices=DTYPE_NAMES, default=None,
                   help="dtype of the saved weights (default: the compute dtype)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing iteration in --save")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from megatron_ext.errors import MegatronExtError
    from megatron_ext import platform
    from megatron_ext.sparsity.oneshot import PruneOptions, prune_checkpoint

    try:
        info = platform.init_distributed(args.tensor_model_parallel_size)
    except ValueError as e:
        print(f"error: --tensor-model-parallel-size: {e}", file=sys.stderr)
        return 2
    say = (lambda msg: print(msg, flush=True)) if info.rank == 0 else (lambda msg: None)
    try:
        opts = PruneOptions(method=args.method, N=args.N, M=args.M, update_weight=args.update_weight,
                            blocksize=args.blocksize, percdamp=args.percdamp, row_hessian=args.row_hessian,
                            sequential=not args.no_sequential)
        try:
            platform.seed_everything(args.seed)
            result = prune_checkpoint(args.load, args.save, opts, calib_data=args.calib_data,
                                      num_samples=args.hessian_samples, seq_length=args.seq_length,
                                      seed=args.seed, params_dtype=args.dtype, save_dtype=args.save_dtype,
                                      tokenizer_type=args.tokenizer_type, overwrite=args.overwrite, log=say)
        except (MegatronExtError, OSError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        kept = sum(int(m.sum()) for m in result.masks.values())
        total = sum(m.numel() for m in result.masks.values())
        say(f"{args.method} {args.N}:{args.M}: {len(result.masks)} masked linears, TP={info.tp_size}, "
            f"{1 - kept / total:.4f} of their weights pruned (rank 0 shard), {result.seconds:.1f}s")
        say(f"saved {result.save}")
        return 0
    finally:
        platform.destroy_distributed()


if __name__ == "__main__":
    sys.exit(main())
