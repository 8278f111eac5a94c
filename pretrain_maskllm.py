#!/usr/bin/env python3
"""Train with Megatron-LM's flags: dense (pre)training, fine-tuning, MaskLLM N:M masks.

    torchrun --nproc_per_node=8 pretrain_maskllm.py --model llama2-7b --tensor-model-parallel-size 8 \\
        --load ckpt/llama2-7b --finetune --mask-only --N 2 --M 4 ... --save ckpt/llama2-7b-2of4

See ``python pretrain_maskllm.py --help`` and megatron_ext/training.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from megatron_ext.train import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
