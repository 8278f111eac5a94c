"""Throughput of the training loop: dense training and MaskLLM mask-only training through the
trainer (data, micro-batches, fp32 gradient buffer, clipping, AdamW, schedules), beside a bare
forward + backward loop over the same micro-batches (no optimizer) as the baseline.

Default: a 4-layer LLaMA-2-7B-shaped model, sequence 4096, micro-batch 1, global batch 8
(8 micro-batches), bf16, one GPU, on a .bin/.idx dataset tokenized with the LLaMA tokenizer.
Iterations after ``--warmup`` are timed one by one (the loop synchronises every iteration
for its loss and gradient norm); the peak memory covers model, optimizer state and
activations.

    python benchmarks/bench_train.py --data-path PREFIX --tokenizer-model tokenizer.model   # GPU
    python benchmarks/bench_train.py --tiny                                               # CPU check

Prints a markdown table.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from bench_common import (MASK_ONLY_FLAGS, memory_gib, reset_memory, tiny_data, timed_steps,  # noqa: E402
                          trainer_argv)
from megatron_ext import platform  # noqa: E402
from megatron_ext.train import Run, parse_args  # noqa: E402  (the trainer with the MaskLLM plug-in)
from megatron_ext.training.evaluate import masked_loss_sums  # noqa: E402


def time_trainer(opts, extra):
    reset_memory()
    run = Run(parse_args(trainer_argv(opts, extra)))
    try:
        sec, losses = timed_steps(lambda: run.train_step()["loss"], opts.iters, opts.warmup)
        return sec, memory_gib(), losses
    finally:
        run.close()
        del run


def time_bare(opts):
    """Forward + backward of the same micro-batches on the dense model, gradients dropped."""
    reset_memory()
    run = Run(parse_args(trainer_argv(opts, [])))
    model, stream = run.model, run.train_stream
    run.optimizer.close()  # plain autograd: the parameters' .grad, no fp32 buffer
    n_micro = run.plan.stages[0].num_microbatches(run.dinfo.dp_size)

    def step():
        total = 0.0
        for _ in range(n_micro):
            s, c = masked_loss_sums(model, stream.next())
            loss = s / c
            (loss / n_micro).backward()
            total += loss.detach()
        for p in model.parameters():
            p.grad = None
        return float(total / n_micro)

    try:
        sec, losses = timed_steps(step, opts.iters, opts.warmup)
        return sec, memory_gib(), losses
    finally:
        run.close()
        del run, model, stream


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="llama2-7b")
    p.add_argument("--num-layers", type=int, default=4)
    p.add_argument("--max-position-embeddings", type=int)
    p.add_argument("--seq", type=int, default=4096)
    p.add_argument("--mbs", type=int, default=1)
    p.add_argument("--gbs", type=int, default=8)
    p.add_argument("--iters", type=int, default=8)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--fp32", dest="bf16", action="store_false")
    p.add_argument("--data-path")
    p.add_argument("--tokenizer-model")
    p.add_argument("--modes", default="bare,dense,mask-only,mask-only-hard")
    p.add_argument("--tiny", action="store_true", help="tiny model, seq 64, the shipped sample: a CPU check")
    opts = p.parse_args()
    tmp = tempfile.mkdtemp(prefix="bench-train-")
    opts.log_dir = os.path.join(tmp, "logs")
    if opts.tiny:
        opts.model, opts.num_layers, opts.seq, opts.gbs, opts.mbs, opts.iters, opts.warmup = "tiny", None, 64, 4, 2, 4, 1
        opts.data_path, opts.tokenizer_model = tiny_data(tmp)
    if not opts.data_path or not opts.tokenizer_model:
        p.error("--data-path and --tokenizer-model are required (or --tiny)")

    modes = {
        "bare": ("dense fwd+bwd only (baseline)", None),
        "dense": ("dense training (trainer)", []),
        "mask-only": ("2:4 mask-only (trainer)", list(MASK_ONLY_FLAGS)),
        "mask-only-hard": ("2:4 mask-only --hard (trainer)", list(MASK_ONLY_FLAGS) + ["--hard"]),
    }
    device = torch.cuda.get_device_name() if platform.has_cuda() else "CPU"
    layers = f" x{opts.num_layers}L" if opts.num_layers else ""
    print(f"device: {device}; torch {torch.__version__}; {opts.model}{layers}, seq {opts.seq}, micro-batch {opts.mbs}, "
          f"global batch {opts.gbs}, {'bf16' if opts.bf16 else 'fp32'}; median of iterations {opts.warmup + 1}.."
          f"{opts.iters}")
    print()
    print("| model | run | ms/iter | tokens/s | peak mem GiB | loss first -> last |")
    print("|---|---|---|---|---|---|")
    for key in opts.modes.split(","):
        label, extra = modes[key]
        try:
            sec, mem, losses = time_bare(opts) if extra is None else time_trainer(opts, extra)
        except torch.OutOfMemoryError:
            print(f"| {opts.model}{layers} | {label} | out of memory | | | |", flush=True)
            continue
        tokens = opts.gbs * opts.seq / sec
        print(f"| {opts.model}{layers} | {label} | {sec * 1000:.1f} | {tokens:,.0f} | {mem:.2f} | "
              f"{losses[0]:.4f} -> {losses[-1]:.4f} |", flush=True)
    platform.destroy_distributed()


if __name__ == "__main__":
    main()
