#!/usr/bin/env bash
# MaskLLM incremental mask learning: LLaMA-3.1-8B 2:4 masks learned on C4, adapted to
# WikiText-103, tensor-parallel 8 (weights frozen).
#
#   bash run_maskllm_native.sh scripts/incremental/llama3.1_8b_mask_only_wikitext103_tp8.sh 0   # start
#   bash run_maskllm_native.sh scripts/incremental/llama3.1_8b_mask_only_wikitext103_tp8.sh 1   # resume
#
# The recipe of scripts/incremental/llama3_8b_mask_only_wikitext103_tp8.sh (see there for the
# resume flag, PRIOR_STRENGTH and the variables), run on LLaMA-3.1-8B, whose "llama3" rotary
# scaling of factor 8 is read from its config.json, from the masks of
# scripts/learnable_sparsity/llama3.1_8b_mask_only_tp8_c4.sh. Only the model, its Hugging Face
# directory (LLAMA31_HF: tokenizer.json) and the names of the data, checkpoints and tag differ.
set -euo pipefail
LLAMA3_HF=${LLAMA31_HF:-assets/checkpoints/llama3.1_8b_hf}                 # the Hugging Face directory: tokenizer
HF_VAR=LLAMA31_HF                                                          # the variable the messages name for it
MODEL=llama3.1-8b
WIKI_HOME=${WIKI_HOME:-assets/data/wikitext103_llama3.1_pretokenized}       # scripts/data/prepare_wikitext103_llama3.1.sh
TOKENIZER_NAME=llama3.1
C4_MASK_CKPT=${C4_MASK_CKPT:-output/checkpoints/llama3.1-8b-tp8-mask-only-c4/train_iters_2000/ckpt}
TAG=${TAG:-llama3.1-8b-tp8-mask-only-wikitext103-c4format}
# Sourced, not run with bash, so that its messages name this script.
. "$(dirname "${BASH_SOURCE[0]}")/llama3_8b_mask_only_wikitext103_tp8.sh" "$@"
