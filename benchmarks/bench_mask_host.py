"""The host's share of a masked linear: Python calls and time per micro-batch, against dense.

At micro-batch 1 a training step of the TP4 rank proxy is bound by the Python that queues it
(benchmarks/RESULTS.md, "where a micro-batch-1 step of the proxy waits"), so what a masked
linear adds to each micro-batch's host work shows up in the step time. This measures it where
it can be measured exactly: one megatron-core ``ColumnParallelLinear`` (the weight trains, as
in dense training) against one ``MaskedColumnParallelLinear`` (mask-only: the logits train),
both tiny (the tensors' work is negligible), bf16, a micro-batch = forward + backward of a
few tokens, the step's draw cached (its build and the step's mask backward, once per step,
are outside the count):

* Python calls per micro-batch (function calls and C calls seen by ``sys.setprofile``; the
  same on every machine for a given torch and megatron-core), and the calls that differ by
  function;
* host time per micro-batch (median over repeats; this machine's speed, noisy on a shared host).

    python benchmarks/bench_mask_host.py [--micro-batches 32] [--repeats 7] [--out FILE]
"""
from __future__ import annotations

import argparse
import collections
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_common import emit, environment  # noqa: E402
from megatron.core import ModelParallelConfig  # noqa: E402
from megatron.core.tensor_parallel.layers import ColumnParallelLinear  # noqa: E402

from megatron_ext import platform  # noqa: E402
from megatron_ext.sparsity import MaskedColumnParallelLinear, SparsityState, finish_mask_backward  # noqa: E402

WIDTH = 64


def build_layers():
    """(dense, masked): the same tiny shape; the masked one in mask-only training."""
    config = ModelParallelConfig(params_dtype=torch.bfloat16)
    kwargs = dict(config=config, init_method=torch.nn.init.normal_, bias=False, gather_output=False)
    dense = ColumnParallelLinear(WIDTH, WIDTH, **kwargs)
    state = SparsityState(N=2, M=4, seed=1)
    state.mode = "train"
    masked = MaskedColumnParallelLinear(WIDTH, WIDTH, sparsity=state, **kwargs)
    masked.set_layer_name("decoder.layers.0.mlp.linear_fc1")
    masked.weight.requires_grad_(False)
    return dense, masked


def micro_batch(layer, x) -> None:
    layer(x)[0].float().sum().backward()


def start_step(layer, x) -> None:
    """Finish the previous step and run the new step's first micro-batch (builds the draw)."""
    finish_mask_backward(layer)
    micro_batch(layer, x)


def count_calls(layer, x, micro_batches: int) -> collections.Counter:
    start_step(layer, x)
    calls: collections.Counter = collections.Counter()

    def profile(frame, event, arg):
        if event == "call":
            code = frame.f_code
            calls[f"{os.path.basename(code.co_filename)}:{code.co_name}"] += 1
        elif event == "c_call":
            calls[f"C:{getattr(arg, '__qualname__', repr(arg))}"] += 1

    sys.setprofile(profile)
    try:
        for _ in range(micro_batches):
            micro_batch(layer, x)
    finally:
        sys.setprofile(None)
    finish_mask_backward(layer)
    return calls


def host_time(layer, x, micro_batches: int, repeats: int) -> float:
    """Median seconds per micro-batch (the step's first micro-batch, with the draw, excluded)."""
    times = []
    for _ in range(repeats):
        start_step(layer, x)
        t = time.perf_counter()
        for _ in range(micro_batches):
            micro_batch(layer, x)
        times.append((time.perf_counter() - t) / micro_batches)
    finish_mask_backward(layer)
    return statistics.median(times)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--micro-batches", type=int, default=32, help="micro-batches per step")
    p.add_argument("--repeats", type=int, default=7, help="timed steps (median)")
    p.add_argument("--top", type=int, default=12, help="functions listed among those that differ")
    p.add_argument("--out", help="also write the table here")
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    platform.init_distributed(1)
    platform.seed_everything(1)
    dense, masked = build_layers()
    x = torch.randn(2, 1, WIDTH, dtype=torch.bfloat16, requires_grad=True)
    for layer in (dense, masked):  # warm up both paths
        host_time(layer, x, 4, 2)
    counts = {name: count_calls(layer, x, a.micro_batches) for name, layer in (("dense", dense), ("masked", masked))}
    times = {name: host_time(layer, x, a.micro_batches, a.repeats)
             for name, layer in (("dense", dense), ("masked", masked))}
    n = a.micro_batches
    per = {name: sum(c.values()) / n for name, c in counts.items()}
    lines = ["## Masked linear: host work per micro-batch against dense (bench_mask_host.py)", "",
             *environment(), f"- {WIDTH}x{WIDTH} bf16, {n} micro-batches per step, the step's draw cached; "
             f"time: median of {a.repeats} steps", "",
             "| layer | Python calls / micro-batch | host us / micro-batch |", "|---|---|---|",
             f"| ColumnParallelLinear (dense, weight trains) | {per['dense']:.1f} | {times['dense'] * 1e6:.1f} |",
             f"| MaskedColumnParallelLinear (mask-only) | {per['masked']:.1f} | {times['masked'] * 1e6:.1f} |",
             f"| masked - dense | {per['masked'] - per['dense']:+.1f} | "
             f"{(times['masked'] - times['dense']) * 1e6:+.1f} |",
             "", "| calls that differ (masked - dense, per micro-batch) | calls |", "|---|---|"]
    diff = {k: (counts["masked"][k] - counts["dense"][k]) / n for k in counts["masked"] | counts["dense"]}
    diff = {k: v for k, v in diff.items() if abs(v) >= 0.5}
    for k, v in sorted(diff.items(), key=lambda kv: (-kv[1], kv[0]))[:a.top]:
        lines.append(f"| `{k}` | {v:+.0f} |")
    emit("\n".join(lines), a.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
