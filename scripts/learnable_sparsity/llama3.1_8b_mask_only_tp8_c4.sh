#!/usr/bin/env bash
# MaskLLM: learn 2:4 masks of LLaMA-3.1-8B on 20 C4 shards, tensor-parallel 8 (weights frozen).
#
#   bash run_maskllm_native.sh scripts/learnable_sparsity/llama3.1_8b_mask_only_tp8_c4.sh 0   # start
#   bash run_maskllm_native.sh scripts/learnable_sparsity/llama3.1_8b_mask_only_tp8_c4.sh 1   # resume
#
# The recipe of scripts/learnable_sparsity/llama3_8b_mask_only_tp8_c4.sh (see there for the
# resume flag, the hyperparameters MaskLLM ships for LLaMA-3-8B and the variables), run on
# LLaMA-3.1-8B: LLaMA-3-8B's shapes (128k vocabulary, 8 query groups, rotary base 5e5) with
# the "llama3" rotary scaling of factor 8 (128k positions), read from its config.json. Only
# the model, its Hugging Face directory (LLAMA31_HF: tokenizer.json) and the names of the
# data, checkpoints and tag differ. DENSE_CKPT is made from the Hugging Face directory with
#   tools/convert_checkpoint.py --source-format hf --target-format megatron \
#       --load $LLAMA31_HF --save $DENSE_CKPT --target-tp 8 --dtype bf16
set -euo pipefail
LLAMA3_HF=${LLAMA31_HF:-assets/checkpoints/llama3.1_8b_hf}                 # the Hugging Face directory: tokenizer
HF_VAR=LLAMA31_HF                                                          # the variable the messages name for it
MODEL=llama3.1-8b
C4_HOME=${C4_HOME:-assets/data/c4_llama3.1_pretokenized}                    # scripts/data/prepare_c4_llama3.1.sh
DENSE_CKPT=${DENSE_CKPT:-checkpoints/llama3.1-8b-tp8}                      # from LLAMA31_HF
PRIOR_CKPT=${PRIOR_CKPT:-checkpoints/llama3.1-8b-oneshot/hessian_2_4}      # scripts/oneshot/run_llama3.1_8b_prune_tp8.sh hessian
TAG=${TAG:-llama3.1-8b-tp8-mask-only-c4}
# Sourced, not run with bash, so that its messages name this script.
. "$(dirname "${BASH_SOURCE[0]}")/llama3_8b_mask_only_tp8_c4.sh" "$@"
