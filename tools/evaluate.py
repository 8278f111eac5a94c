#!/usr/bin/env python3
"""Perplexity and next-token accuracy of one checkpoint on several datasets, in one command.

    python tools/evaluate.py --load CKPT --seq-length 2048 \\
        --eval wikitext=wiki.test.raw --eval c4=data/c4_val_text_document --output eval.json
    torchrun --nproc_per_node 4 tools/evaluate.py --load CKPT --sparse \\
        --tensor-model-parallel-size 2 --eval wikitext=wiki.test.raw --seq-length 4096

Each ``--eval NAME=PATH`` is a UTF-8 text file (tokenized whole with the checkpoint's
tokenizer) or the prefix of a tokenized Megatron ``.bin/.idx`` dataset. The model is
loaded once; every set is cut into non-overlapping windows of --seq-length tokens and
scored as ``tools/eval_ppl.py`` scores it (the same numbers). Prints a table (set,
perplexity, top-1 accuracy, tokens) and, with --output, writes it as JSON.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from megatron_ext.cli import add_model_flags, add_window_flags
from megatron_ext.errors import InputError


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_flags(p)
    p.add_argument("--eval", action="append", required=True, metavar="NAME=PATH", dest="evals",
                   help="a set to evaluate: a text file or a .bin/.idx prefix (repeat for more sets)")
    add_window_flags(p, "evaluate only the first N windows of each set")
    p.add_argument("--output", default=None, metavar="JSON", help="also write the results to this JSON file")
    return p.parse_args(argv)


class EvalSpecError(InputError):
    """A bad --eval or --output value (the message names the flag and the value)."""


def parse_eval_specs(specs: list[str]) -> list[tuple[str, str, str]]:
    """``NAME=PATH`` values -> ``(name, kind, path)`` with kind ``text`` or ``dataset``; the
    files must exist (checked here, before any weight is read)."""
    out: list[tuple[str, str, str]] = []
    seen: set[str] = set()
    for spec in specs:
        name, sep, path = spec.partition("=")
        name = name.strip()
        if not sep or not name or not path:
            raise EvalSpecError(f"--eval {spec!r}: expected NAME=PATH (a text file or a .bin/.idx prefix)")
        if name in seen:
            raise EvalSpecError(f"--eval {spec!r}: the name {name!r} is given twice")
        seen.add(name)
        if Path(path).is_file():
            out.append((name, "text", path))
        elif Path(f"{path}.bin").is_file() and Path(f"{path}.idx").is_file():
            out.append((name, "dataset", path))
        else:
            raise EvalSpecError(f"--eval {spec!r}: {path}: no such text file, nor a {path}.bin/.idx dataset")
    return out


def result_table(rows: list[dict]) -> str:
    """The printed table: one line per set."""
    width = max([len("set")] + [len(r["name"]) for r in rows])
    lines = [f"{'set':<{width}}  {'perplexity':>12}  {'accuracy':>8}  {'tokens':>10}"]
    lines += [f"{r['name']:<{width}}  {r['ppl']:>12.4f}  {r['accuracy']:>8.4f}  {r['tokens']:>10d}" for r in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        sets = parse_eval_specs(args.evals)
        if args.output is not None and not Path(args.output).resolve().parent.is_dir():
            raise EvalSpecError(f"--output {args.output}: directory {Path(args.output).parent} does not exist")
    except EvalSpecError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from megatron_ext.evaluation import evaluate_set, load_model, run_tool

    apply_masks = None
    if args.sparse:  # the sparsity layer only when asked for
        from megatron_ext.sparsity.export import baked_weights as apply_masks

    def work(info) -> None:
        rows = []
        model = load_model(args.load, params_dtype=args.dtype, sparse=args.sparse,
                           tokenizer_type=args.tokenizer_type,
                           apply_masks=apply_masks)
        for name, kind, path in sets:
            result = evaluate_set(model, seq_length=args.seq_length, micro_batch_size=args.micro_batch_size,
                                  max_windows=args.max_windows,
                                  **({"text_file": path} if kind == "text" else {"data_path": path}))
            rows.append({"name": name, "path": path, "kind": kind, "ppl": result.ppl, "loss": result.loss,
                         "accuracy": result.accuracy, "tokens": result.tokens, "windows": result.windows})
            if info.rank == 0:
                print(f"{name}: PPL {result.ppl:.6f} accuracy {result.accuracy:.6f} tokens {result.tokens}",
                      flush=True)
        if info.rank == 0:
            print(result_table(rows), flush=True)
            if args.output is not None:
                from megatron_ext.files import atomic_write_text

                report = {"load": str(args.load), "sparse": args.sparse, "seq_length": args.seq_length,
                          "dtype": args.dtype, "tensor_model_parallel_size": info.tp_size,
                          "max_windows": args.max_windows, "sets": rows}
                atomic_write_text(Path(args.output), json.dumps(report, indent=2) + "\n", durable=True)

    return run_tool(args.tensor_model_parallel_size, work)

if __name__ == "__main__":
    sys.exit(main())
