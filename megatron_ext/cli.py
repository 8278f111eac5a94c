"""Flags the command-line tools share: each defined once, with its name, type, choices and
meaning (the trainer's flags are ``megatron_ext.training.arguments``'). Importing this
module costs nothing: a tool parses its flags before it loads torch."""
from __future__ import annotations

import argparse

DTYPE_NAMES = ("fp32", "bf16", "fp16")   # the names megatron_ext.checkpoint.layout.DTYPES maps


def add_model_flags(p: argparse.ArgumentParser,
                    load_help: str = "our checkpoint directory or a Hugging Face model directory") -> None:
    """A checkpoint to load and how to run it: ``--load``, ``--tensor-model-parallel-size``,
    ``--dtype`` (compute), ``--tokenizer-type`` (an override of the checkpoint's)."""
    p.add_argument("--load", required=True, help=load_help)
    p.add_argument("--tensor-model-parallel-size", type=int, default=1,
                   help="tensor-parallel size to run at (a checkpoint saved at another size is resharded)")
    p.add_argument("--dtype", choices=DTYPE_NAMES, default="fp32", help="compute dtype of the model")
    p.add_argument("--tokenizer-type", default=None,
                   help="override the tokenizer type recorded with the checkpoint (e.g. HuggingFaceTokenizer)")


def add_window_flags(p: argparse.ArgumentParser, max_windows_help: str = "evaluate only the first N windows") -> None:
    """Perplexity over non-overlapping windows: ``--seq-length``, ``--micro-batch-size``,
    ``--sparse``, ``--max-windows``."""
    p.add_argument("--seq-length", type=int, required=True, help="window length in tokens")
    p.add_argument("--micro-batch-size", type=int, default=1)
    p.add_argument("--sparse", action="store_true",
                   help="apply the checkpoint's hard N:M masks (argmax of its mask logits, or its hard masks)")
    p.add_argument("--max-windows", type=int, default=None, help=max_windows_help)


__all__ = ["DTYPE_NAMES", "add_model_flags", "add_window_flags"]
