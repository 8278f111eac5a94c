"""``python -m megatron_ext.train [Megatron-LM flags]``: the trainer with the MaskLLM plug-in.

This is the entry point ``pretrain_maskllm.py`` runs: the generic trainer
(``megatron_ext.training``) with ``PLUGINS`` attached. Run it under ``torchrun`` for
tensor / data parallelism (``--nproc_per_node`` = TP x DP). Bad flags, missing files or
checkpoints stop the run before training with one line naming the flag or file (exit
status 2; 1 for failures during training); anything else is a bug and keeps its traceback.
"""
from __future__ import annotations

import sys
from argparse import Namespace
from typing import Optional, Sequence

from megatron_ext.sparsity.plugin import MaskLLM
from megatron_ext import training

PLUGINS = (MaskLLM,)


def parse_args(argv: Optional[Sequence[str]] = None) -> Namespace:
    return training.parse_args(argv, PLUGINS)


def build_parser():
    from megatron_ext.training.arguments import build_parser as build

    return build(PLUGINS)


class Run(training.Run):
    """``training.Run`` with this entry point's plug-ins."""

    def __init__(self, args: Namespace, model_factory=None) -> None:
        super().__init__(args, PLUGINS, model_factory)


def pretrain(argv: Sequence[str] | Namespace | None = None, model_factory=None) -> training.TrainResult:
    return training.pretrain(argv, PLUGINS, model_factory)


def main(argv: Optional[Sequence[str]] = None) -> int:
    from megatron_ext.errors import MegatronExtError, report

    args = list(sys.argv[1:] if argv is None else argv)
    if "-h" in args or "--help" in args:
        build_parser().print_help()
        return 0
    try:
        pretrain(args)
    except MegatronExtError as e:
        return report(e, "pretrain_maskllm.py")
    finally:
        if "torch.distributed" in sys.modules:
            from megatron_ext import platform

            platform.destroy_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main())
