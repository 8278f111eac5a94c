"""Pieces the training and inference benchmarks share: trainer flags, timing, memory,
the run's environment line, and writing the tables.

Import after the benchmark has put the repository root on ``sys.path``.
"""
from __future__ import annotations

import gc
import os
import shlex
import statistics
import sys
import time
from typing import Callable, Optional, Sequence

import torch

from megatron_ext import platform

REPO = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")

# MaskLLM's mask-only flags (weights frozen, 2:4 logits at 10x the learning rate, the sparse weight regulariser).
MASK_ONLY_FLAGS = ("--mask-only", "--N", "2", "--M", "4", "--lr-mult", "10", "--weight-reg", "1e-5")


def trainer_argv(opts, extra: Sequence[str] = (), *, seq: Optional[int] = None, tp: int = 1) -> list[str]:
    """The trainer's flags for a benchmark run: no evaluation, no checkpoints, logs in ``opts.log_dir``.

    ``opts`` carries ``model``, ``num_layers``, ``mbs``, ``gbs``, ``iters``, ``bf16``, ``data_path``,
    ``tokenizer_model``, ``log_dir`` (and ``seq`` unless given).
    """
    seq = opts.seq if seq is None else seq
    argv = ["--model", opts.model, "--seq-length", str(seq), "--micro-batch-size", str(opts.mbs),
            "--global-batch-size", str(opts.gbs), "--train-iters", str(opts.iters), "--lr", "5e-5",
            "--min-lr", "5e-6", "--lr-decay-style", "cosine", "--weight-decay", "0.1", "--adam-beta2", "0.95",
            "--clip-grad", "1.0", "--data-path", opts.data_path, "--split", "100,0,0",
            "--tokenizer-type", "Llama2Tokenizer", "--tokenizer-model", opts.tokenizer_model,
            "--log-interval", "1000000", "--eval-iters", "0", "--log-dir", opts.log_dir, "--seed", "1234",
            "--tensor-model-parallel-size", str(tp)]
    if opts.num_layers:
        argv += ["--num-layers", str(opts.num_layers)]
    if getattr(opts, "max_position_embeddings", None):
        argv += ["--max-position-embeddings", str(opts.max_position_embeddings)]
    if opts.bf16:
        argv.append("--bf16")
    return argv + list(extra)


def reset_memory() -> None:
    """Free what earlier cases left and restart the peak-memory counters."""
    gc.collect()
    if platform.has_cuda():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def memory_gib() -> float:
    """Peak allocated GPU memory of this process since ``reset_memory`` (NaN on the CPU)."""
    return torch.cuda.max_memory_allocated() / 2**30 if platform.has_cuda() else float("nan")


def timed_steps(step: Callable[[], float], iters: int, warmup: int) -> tuple[float, list[float]]:
    """Run ``step`` ``iters`` times, synchronising around each; the median seconds of the
    iterations after ``warmup`` and the values ``step`` returned (its losses)."""
    times, losses = [], []
    for i in range(iters):
        platform.synchronize()
        t = time.perf_counter()
        losses.append(step())
        platform.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - t)
    return statistics.median(times), losses


def tiny_data(tmp: str) -> tuple[str, str]:
    """The shipped sample tokenized with its small tokenizer into ``tmp``: (data prefix, tokenizer)."""
    from megatron_ext.data.preprocess import PreprocessConfig, preprocess

    tok = os.path.join(REPO, "examples", "data", "tokenizer.model")
    res = preprocess(PreprocessConfig(inputs=[os.path.join(REPO, "examples", "data", "shakespeare_train.jsonl")],
                                      output_prefix=os.path.join(tmp, "sample"), tokenizer_type="Llama2Tokenizer",
                                      tokenizer_model=tok, append_eod=True), log=None)
    return res.outputs["text"], tok


def environment(world_size: int = 1) -> list[str]:
    """Markdown lines: the command, the machine and library versions, the date."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        mcore = version("megatron-core")
    except PackageNotFoundError:
        mcore = "not installed"
    launcher = f"torchrun --nproc_per_node {world_size}" if world_size > 1 else "python"
    device = torch.cuda.get_device_name() if platform.has_cuda() else "CPU"
    count = f" x {world_size}" if world_size > 1 else ""
    return [f"- Command: `{launcher} {shlex.join(sys.argv)}`",
            f"- Device: {device}{count}; torch {torch.__version__}; megatron-core {mcore}; "
            f"Python {sys.version.split()[0]}",
            f"- Date: {time.strftime('%Y-%m-%d %H:%M %Z')}"]


def emit(text: str, out: Optional[str], echo: bool = True) -> None:
    """Print ``text`` (unless ``echo`` is False) and, with ``out``, write it there (atomically)."""
    if echo:
        print(text, flush=True)
    if out:
        from megatron_ext.files import atomic_write_text

        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        atomic_write_text(out, text + "\n")
