#!/usr/bin/env python3
"""One-shot 2:4 pruning quality on real SmolLM2-135M: held-out perplexity of dense,
magnitude, Wanda and SparseGPT.

    python benchmarks/quality/oneshot_smollm2.py [--work DIR] [--samples 64] [--seq-length 512]

Every step is one of our tools, run as a subprocess and printed:

1. the GGUF weights are imported as our checkpoint (tools/convert_checkpoint.py);
2. calibration text: the Python 3.11 documentation sources, concatenated;
3. each method prunes with --samples random windows of --seq-length tokens
   (tools/prune_oneshot.py), the masks are baked into a Hugging Face export
   (tools/export_sparse.py, fp32 so only the pruning differs from dense), checked
   2:4 (tools/check_sparsity.py);
4. perplexity on a different text, botchan.txt (an English novel), in windows of
   --seq-length tokens, the first --eval-windows of them (tools/eval_ppl.py).

Prints a markdown table (method, PPL, tokens, seconds of pruning) and the commands.
CPU is enough: each perplexity evaluation and each calibrated pruning is roughly ten
minutes on two cores.
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
METHODS = {
    "magnitude": [],
    "wanda": [],
    "sparsegpt": ["--update-weight"],
    "sparsegpt-mask": [],  # SparseGPT's mask on the original weights (the prior MaskLLM starts from)
}


def run(cmd: list[str], log: list[str]) -> str:
    shown = " ".join(str(c) for c in cmd).replace(str(REPO) + "/", "")
    log.append(shown)
    print(f"$ {shown}", flush=True)
    res = subprocess.run([str(c) for c in cmd], cwd=REPO, capture_output=True, text=True)
    if res.returncode != 0:
        sys.stderr.write(res.stdout[-3000:] + res.stderr[-3000:])
        raise SystemExit(f"command failed ({res.returncode}): {shown}")
    return res.stdout


def ppl_of(output: str) -> tuple[float, int]:
    m = re.search(r"^PPL (\S+) tokens (\d+)$", output.strip().splitlines()[-1])
    if not m:
        raise SystemExit(f"no PPL line in output: {output[-500:]}")
    return float(m.group(1)), int(m.group(2))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", default=None, help="working directory (default: a temporary one)")
    p.add_argument("--samples", type=int, default=64, help="calibration windows (default 64)")
    p.add_argument("--seq-length", type=int, default=512, help="calibration and evaluation window (default 512)")
    p.add_argument("--eval-windows", type=int, default=100, help="evaluation windows (default 100)")
    p.add_argument("--methods", default="magnitude,wanda,sparsegpt",
                   help=f"comma-separated, from {', '.join(METHODS)}")
    args = p.parse_args()
    methods = [m for m in args.methods.split(",") if m]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise SystemExit(f"--methods: unknown {unknown}; known: {', '.join(METHODS)}")

    from megatron_ext import assets

    work = Path(args.work or tempfile.mkdtemp(prefix="oneshot-smollm2-"))
    work.mkdir(parents=True, exist_ok=True)
    py = sys.executable
    log: list[str] = []
    dense = work / "dense"
    if not dense.exists():
        run([py, "tools/convert_checkpoint.py", "--source-format", "gguf", "--target-format", "megatron",
             "--load", assets.smollm2_gguf(), "--save", dense], log)
    calib = work / "python_docs.txt"
    if not calib.exists():
        tmp = calib.with_suffix(".tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            for src in assets.python_doc_sources():
                f.write(src.read_text(encoding="utf-8", errors="replace"))
                f.write("\n\n")
        os.replace(tmp, calib)
    held_out = assets.botchan_text()
    eval_args = ["--text-file", held_out, "--seq-length", args.seq_length, "--max-windows", args.eval_windows]

    rows = []
    t0 = time.perf_counter()
    out = run([py, "tools/eval_ppl.py", "--load", dense, *eval_args], log)
    rows.append(("dense", *ppl_of(out), 0.0, time.perf_counter() - t0))
    print(f"  -> dense: PPL {rows[-1][1]:.3f}", flush=True)
    for method in methods:
        base = method.split("-")[0]
        pruned, hf = work / method, work / f"{method}_hf"
        t0 = time.perf_counter()
        cmd = [py, "tools/prune_oneshot.py", "--load", dense, "--method", base, "--N", 2, "--M", 4,
               "--save", pruned, "--overwrite", *METHODS[method]]
        if base != "magnitude":
            cmd += ["--calib-data", calib, "--hessian-samples", args.samples, "--seq-length", args.seq_length]
        run(cmd, log)
        prune_s = time.perf_counter() - t0
        run([py, "tools/export_sparse.py", "--load", pruned, "--save", hf, "--format", "hf", "--dtype", "fp32",
             "--overwrite"], log)
        run([py, "tools/check_sparsity.py", hf, "--N", 2, "--M", 4, "--quiet"], log)
        t1 = time.perf_counter()
        out = run([py, "tools/eval_ppl.py", "--load", hf, *eval_args], log)
        rows.append((method, *ppl_of(out), prune_s, time.perf_counter() - t1))
        print(f"  -> {method}: PPL {rows[-1][1]:.3f}", flush=True)

    print()
    print(f"SmolLM2-135M (GGUF Q4_1 dequantized, fp32), 2:4 on every q/k/v/o/gate/up/down projection; "
          f"calibration {args.samples} x {args.seq_length} tokens of Python docs; held-out PPL on botchan.txt")
    print()
    print("| method | PPL (botchan, seq %d) | tokens | prune s | eval s |" % args.seq_length)
    print("| --- | --- | --- | --- | --- |")
    for name, ppl, tokens, prune_s, eval_s in rows:
        print(f"| {name} | {ppl:.3f} | {tokens} | {prune_s:.0f} | {eval_s:.0f} |")
    print()
    print("Commands:")
    for c in log:
        print(f"    {c}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
