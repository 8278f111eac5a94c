"""``python -m megatron_ext.train [Megatron-LM flags]``: the trainer's command line.

Run it under ``torchrun`` for tensor / data parallelism (``--nproc_per_node`` =
TP x DP). Bad flags, missing files or checkpoints stop the run before training with
a message naming the flag (exit status 2; 1 for failures during training).
"""
from __future__ import annotations

import sys
from typing import Optional, Sequence


def main(argv: Optional[Sequence[str]] = None) -> int:
    from megatron_ext.data.gpt_dataset import DatasetError
    from megatron_ext.data.tokenizers import TokenizerError
    from megatron_ext.models.checkpoint import CheckpointError
    from megatron_ext.training.arguments import ArgsError, build_parser
    from megatron_ext.training.data import DataError
    from megatron_ext.training.loop import TrainingError, pretrain
    from megatron_ext.training.reporting import LoggingSetupError
    from megatron_ext.training.schedules import ScheduleError

    args = list(sys.argv[1:] if argv is None else argv)
    if "-h" in args or "--help" in args:
        build_parser().print_help()
        return 0
    try:
        pretrain(args)
    except (ArgsError, DataError, DatasetError, TokenizerError, LoggingSetupError) as e:
        print(f"pretrain_maskllm.py: error: {e}", file=sys.stderr)
        return 2
    except (CheckpointError, ScheduleError, TrainingError) as e:
        print(f"pretrain_maskllm.py: error: {e}", file=sys.stderr)
        return 1
    finally:
        if "torch.distributed" in sys.modules:
            from megatron_ext import platform

            platform.destroy_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main())
