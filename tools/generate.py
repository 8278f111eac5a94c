#!/usr/bin/env python3
"""Greedy continuation of a prompt by an exported 2:4 model, sparse kernels against dense.

    python tools/generate.py --load HF_DIR --prompt "Once upon a time" [--max-new-tokens 32]

--load is a Hugging Face directory written by ``tools/export_sparse.py --format hf`` (with its
tokenizer). The model runs twice from the same weights: with the 2:4 sparse kernels where
they are measured faster (``megatron_ext.inference``), then dense. Each run prints its
continuation, prefill time and decode tokens/s; the last line says whether the two agree.
On a machine without a CUDA GPU both runs use the dense masked weights (a note says so).
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--load", required=True, help="exported Hugging Face directory (with tokenizer files)")
    p.add_argument("--prompt", default="Once upon a time", help="text to continue")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--dtype", choices=tuple(DTYPES), default="bf16", help="compute dtype")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda where available)")
    p.add_argument("--tokenizer", default=None, help="tokenizer directory or file (default: --load)")
    p.add_argument("--sparse-only", action="store_true", help="skip the dense run")
    p.add_argument("--no-graphs", action="store_true", help="decode without CUDA graphs")
    p.add_argument("--compressed-only", action="store_true",
                   help="keep only the compressed 2:4 weights (0.5625x of dense bf16 bytes), no dense copies: "
                        "where dense was measured faster the faster compressed kernel runs instead "
                        "(cuSPARSELt's GEMM or the Triton decode kernel)")
    p.add_argument("--kernel-table", default=None,
                   help="JSON cache of the measured kernel choices (default: ~/.cache/megatron_ext/...)")
    args = p.parse_args(argv)
    if args.max_new_tokens < 1:
        p.error(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    from megatron_ext.checkpoint import infer_tokenizer_type, load_hf_state_dict
    from megatron_ext.checkpoint.hf import read_hf_config
    from megatron_ext.data.tokenizers import build_tokenizer
    from megatron_ext.errors import MegatronExtError
    from megatron_ext.inference import greedy_generate, model_from_state_dict

    try:
        tok_dir = args.tokenizer or args.load
        tok_type = infer_tokenizer_type(tok_dir) if os.path.isdir(tok_dir) else "Llama2Tokenizer"
        if tok_type is None:
            raise MegatronExtError(f"{tok_dir}: no tokenizer.model or tokenizer.json (pass --tokenizer)")
        tokenizer = build_tokenizer(tok_type, tok_dir)
        cfg = read_hf_config(args.load)
        sd = load_hf_state_dict(args.load)
        prompt = tokenizer.tokenize(args.prompt)
        dtype = getattr(torch, DTYPES[args.dtype])
        results = {}
        for label, sparse in (("sparse", True), ("dense", False)):
            if label == "dense" and args.sparse_only:
                break
            model = model_from_state_dict(cfg, sd, sparse=sparse, dtype=dtype, device=args.device,
                                          keep_dense=not args.compressed_only, table_cache=args.kernel_table, max_len=len(prompt) + args.max_new_tokens,
                                          log=lambda m: print(m, file=sys.stderr))
            graphs = False if args.no_graphs else None
            greedy_generate(model, prompt, min(args.max_new_tokens, 2), graphs=graphs)   # warm-up
            gen = greedy_generate(model, prompt, args.max_new_tokens, eos_id=tokenizer.eos,
                                  graphs=graphs)
            results[label] = gen
            mib = model.projection_bytes() / 2**20
            print(f"[{label}] {tokenizer.detokenize(prompt + gen.tokens)}")
            print(f"[{label}] {len(gen.tokens)} new tokens; prefill {len(prompt)} tokens in "
                  f"{gen.prefill_s * 1e3:.1f} ms; decode {gen.decode_tokens_per_s:.1f} tokens/s; "
                  f"projection weights {mib:.1f} MiB on {model.device}")
            del model
        if len(results) == 2:
            s, d = results["sparse"], results["dense"]
            same = sum(a == b for a, b in zip(s.tokens, d.tokens))
            speed = s.decode_tokens_per_s / d.decode_tokens_per_s if d.decode_tokens_per_s else float("nan")
            print(f"sparse vs dense: {same} of {len(d.tokens)} tokens agree; decode {speed:.2f}x, "
                  f"prefill {d.prefill_s / s.prefill_s:.2f}x")
    except (MegatronExtError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
