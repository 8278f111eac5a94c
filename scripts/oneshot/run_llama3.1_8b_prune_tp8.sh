#!/usr/bin/env bash
# One-shot 2:4 pruning of LLaMA-3.1-8B at tensor-parallel size 8 (one node, 8 GPUs).
#
#   bash scripts/oneshot/run_llama3.1_8b_prune_tp8.sh {hessian|magnitude|wanda}
#
# The pruning of scripts/oneshot/run_llama3_8b_prune_tp8.sh (see there for the methods, the
# output and the variables), run on LLaMA-3.1-8B: DENSE_CKPT is its Hugging Face directory
# (config.json with the "llama3" rope_scaling of factor 8, safetensors, tokenizer.json) or our
# checkpoint converted from it; the calibration data is C4 tokenized with its tokenizer
# (scripts/data/prepare_c4_llama3.1.sh). The output OUTPUT_ROOT/hessian_2_4 is the prior of
# scripts/learnable_sparsity/llama3.1_8b_mask_only_tp8_c4.sh.
set -euo pipefail
DENSE_CKPT=${DENSE_CKPT:-assets/checkpoints/llama3.1_8b_hf}                          # HF directory or our checkpoint
CALIB_DATA=${CALIB_DATA:-assets/data/c4_llama3.1_pretokenized/c4_00000_text_document} # .bin/.idx prefix or a text file
OUTPUT_ROOT=${OUTPUT_ROOT:-checkpoints/llama3.1-8b-oneshot}
# Sourced, not run with bash, so that its messages name this script.
. "$(dirname "${BASH_SOURCE[0]}")/run_llama3_8b_prune_tp8.sh" "$@"
