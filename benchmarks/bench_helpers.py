"""Sample/blending index helpers: megatron_ext._native against megatron-core's helpers_cpp.

Runs both on the same inputs in one process, checks the outputs are identical and
prints one markdown row per helper (best of --repeat runs; CPU time sums all threads):

    | helper | workload | megatron wall (s) | ours wall (s) | wall ratio | megatron cpu (s) | ours cpu (s) | identical |

Usage: python benchmarks/bench_helpers.py [--documents 10000000] [--epochs 3]
       [--seq-length 4096] [--datasets 20] [--samples 50000000] [--repeat 3] [--threads 0]
"""
from __future__ import annotations

import argparse
import os
import time

import numpy as np

from megatron_ext import _native


def _load_helpers_cpp():
    """megatron-core's compiled helpers, without importing megatron.core (and torch)."""
    import glob
    import importlib.machinery
    import importlib.util

    spec = importlib.util.find_spec("megatron")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("megatron-core is not installed")
    root = list(spec.submodule_search_locations)[0]
    hits = glob.glob(os.path.join(root, "core", "datasets", "helpers_cpp*.so"))
    if not hits:
        raise SystemExit("megatron-core's helpers_cpp is not built")
    loader = importlib.machinery.ExtensionFileLoader("helpers_cpp", hits[0])
    module = importlib.util.module_from_spec(importlib.util.spec_from_loader("helpers_cpp", loader))
    loader.exec_module(module)
    return module


def _best_time(fn, repeat: int):
    """Best wall-clock and best CPU time (all threads) over `repeat` runs, and the result."""
    wall = cpu = float("inf")
    result = None
    for _ in range(repeat):
        w0, c0 = time.perf_counter(), time.process_time()
        result = fn()
        wall = min(wall, time.perf_counter() - w0)
        cpu = min(cpu, time.process_time() - c0)
    return (wall, cpu), result


def _row(helper: str, workload: str, theirs, ours, same: bool) -> str:
    return (f"| {helper} | {workload} | {theirs[0]:.3f} | {ours[0]:.3f} | {ours[0] / theirs[0]:.2f}x "
            f"| {theirs[1]:.3f} | {ours[1]:.3f} | {'yes' if same else 'NO'} |")


def bench_sample_idx(helpers_cpp, documents: int, epochs: int, seq_length: int, repeat: int,
                     threads: int) -> str:
    rng = np.random.default_rng(1234)
    # Document lengths of a web-text-like corpus: mostly short, a long tail.
    sizes = np.minimum(rng.lognormal(6.0, 1.2, documents), 1 << 20).astype(np.int32) + 1
    document_index = np.concatenate(
        [rng.permutation(documents).astype(np.int32) for _ in range(epochs)])
    tokens_per_epoch = int(sizes.sum(dtype=np.int64))
    args = (sizes, document_index, seq_length, epochs, tokens_per_epoch, True, 1)
    theirs_t, theirs = _best_time(lambda: helpers_cpp.build_sample_idx_int32(*args), repeat)
    ours_t, ours = _best_time(lambda: _native.build_sample_idx(*args, num_threads=threads), repeat)
    same = ours.dtype == theirs.dtype and np.array_equal(ours, theirs)
    workload = f"{documents:,} docs x {epochs} epochs, seq {seq_length} ({len(ours) - 1:,} samples)"
    return _row("build_sample_idx", workload, theirs_t, ours_t, same)


def bench_blending(helpers_cpp, datasets: int, samples: int, repeat: int, threads: int) -> str:
    rng = np.random.default_rng(4321)
    weights = rng.random(datasets) + 0.05
    weights = (weights / weights.sum()).tolist()

    def run(fn, **kw):
        index = np.zeros(samples, dtype=np.int16)
        sample_index = np.zeros(samples, dtype=np.int64)
        fn(index, sample_index, weights, datasets, samples, False, **kw)
        return index, sample_index

    theirs_t, theirs = _best_time(lambda: run(helpers_cpp.build_blending_indices), repeat)
    ours_t, ours = _best_time(
        lambda: run(_native.build_blending_indices, num_threads=threads), repeat)
    same = np.array_equal(ours[0], theirs[0]) and np.array_equal(ours[1], theirs[1])
    return _row("build_blending_indices", f"{datasets} datasets x {samples:,} samples",
                theirs_t, ours_t, same)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--documents", type=int, default=10_000_000)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--seq-length", type=int, default=4096)
    p.add_argument("--datasets", type=int, default=20)
    p.add_argument("--samples", type=int, default=50_000_000)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--threads", type=int, default=0, help="ours: 0 = automatic")
    args = p.parse_args()

    helpers_cpp = _load_helpers_cpp()  # the reference implementation

    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    print(f"cpus: {cpus}, our threads: {args.threads or 'automatic'}, best of {args.repeat}")
    print("| helper | workload | megatron wall (s) | ours wall (s) | wall ratio | megatron cpu (s) "
          "| ours cpu (s) | identical |")
    print("|---|---|---|---|---|---|---|---|")
    print(bench_sample_idx(helpers_cpp, args.documents, args.epochs, args.seq_length,
                           args.repeat, args.threads), flush=True)
    print(bench_blending(helpers_cpp, args.datasets, args.samples, args.repeat, args.threads),
          flush=True)


if __name__ == "__main__":
    main()
