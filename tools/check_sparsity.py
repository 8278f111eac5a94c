#!/usr/bin/env python3
"""Check that every masked linear of a checkpoint is N:M sparse.

    python tools/check_sparsity.py DIR --N 2 --M 4

DIR is a Hugging Face directory (q/k/v/o_proj, gate/up/down_proj are checked) or one of
our checkpoints (linear_qkv/proj/fc1/fc2 of every TP shard). Every group of M weights
along the input dimension may hold at most N non-zeros. Prints each layer's sparsity;
exits 0 only when every masked layer is N:M, else 1 naming the first offending layer
and group (2 for unreadable input).
"""
from __future__ import annotations

import argparse
import sys


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("path", metavar="DIR", help="Hugging Face directory or our checkpoint directory")
    p.add_argument("--N", type=int, default=2, help="maximum non-zeros per group (default 2)")
    p.add_argument("--M", type=int, default=4, help="group size along the input dimension (default 4)")
    p.add_argument("--quiet", action="store_true", help="print only the summary")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from megatron_ext.errors import MegatronExtError
    from megatron_ext.sparsity.export import check_sparsity

    try:
        report = check_sparsity(args.path, args.N, args.M)
    except (MegatronExtError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not args.quiet:
        for layer in report.layers:
            print(layer.line(args.N))
    naming = ("Hugging Face weights: q, k, v, o, gate, up and down each count" if report.source == "hf"
              else "our weights: fused qkv and gate/up count once")
    print(f"{len(report.layers)} weight matrices checked ({naming}), overall sparsity {report.sparsity:.4f}")
    if not report.ok:
        bad = sum(1 for l in report.layers if l.bad_groups)
        print(f"error: not {args.N}:{args.M} sparse ({bad} layers fail); first: {report.first_violation}",
              file=sys.stderr)
        return 1
    print(f"OK: every masked layer is {args.N}:{args.M} sparse")
    return 0


if __name__ == "__main__":
    sys.exit(main())
