#!/usr/bin/env bash
# Export a learned (or one-shot) N:M checkpoint to a Hugging Face directory with the
# hard masks baked into the weights, then check that every masked linear is N:M sparse.
#
#   bash scripts/tools/export_hf.sh <mask_ckpt> <hf_out> [fp16|bf16|fp32]
#
# <mask_ckpt>: our checkpoint with <layer>.mask_logits (argmax) and/or <layer>.hard_mask,
# e.g. output/checkpoints/llama2-7b-tp4-mask-only-c4/train_iters_2000/ckpt. N and M (default
# 2:4) can be set from the environment. PACKED=1 also writes <hf_out>.masks/masks.npz (the
# masks bit-packed, 0.75 bits per weight at 2:4); OVERWRITE=1 replaces existing outputs.
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/../lib.sh"

if [ $# -lt 2 ] || [ $# -gt 3 ]; then
  echo "usage: $0 <mask_ckpt> <hf_out> [fp16|bf16|fp32]" >&2
  exit 2
fi
MASK_CKPT=$1
HF_OUT=$2
DTYPE=${3:-fp16}
N=${N:-2}
M=${M:-4}
PACKED=${PACKED:-0}
case "$DTYPE" in fp16|bf16|fp32) ;; *) echo "error: dtype must be fp16, bf16 or fp32, got '$DTYPE'" >&2; exit 2 ;; esac

require_checkpoint "$MASK_CKPT" "<mask_ckpt>"
end_checks
[ ! -e "$HF_OUT" ] || [ "${OVERWRITE:-0}" = 1 ] || die "<hf_out> $HF_OUT already exists (OVERWRITE=1 replaces it)"

run_tool "$ROOT/tools/export_sparse.py" --load "$MASK_CKPT" --save "$HF_OUT" --format hf --dtype "$DTYPE" \
  --N "$N" --M "$M" --overwrite
run_tool "$ROOT/tools/check_sparsity.py" "$HF_OUT" --N "$N" --M "$M" --quiet
if [ "$PACKED" = 1 ]; then
  run_tool "$ROOT/tools/export_sparse.py" --load "$MASK_CKPT" --save "$HF_OUT.masks" --format masks \
    --N "$N" --M "$M" --overwrite
fi
