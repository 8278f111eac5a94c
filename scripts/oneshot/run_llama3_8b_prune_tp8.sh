#!/usr/bin/env bash
# One-shot 2:4 pruning of LLaMA-3-8B at tensor-parallel size 8 (one node, 8 GPUs).
#
#   bash scripts/oneshot/run_llama3_8b_prune_tp8.sh {hessian|magnitude|wanda}
#
# hessian = SparseGPT (OBS saliency from the input Hessian, compensated weights).
# The output checkpoint holds the pruned weights and one <layer>.hard_mask per masked
# linear: the prior of MaskLLM mask learning (--prior-mask, --prior-strength), e.g.
# scripts/learnable_sparsity/llama3_8b_mask_only_tp8_c4.sh reads OUTPUT_ROOT/hessian_2_4.
# DENSE_CKPT is the Hugging Face directory itself (config.json, safetensors and
# tokenizer.json: 128k vocabulary, 8 query groups) or our checkpoint converted from it; the
# calibration data is C4 tokenized with its tokenizer (scripts/data/prepare_c4_llama3.sh).
# Paths are relative to the repository root; any variable in capitals below can be set
# from the environment. Extra arguments go to tools/prune_oneshot.py.
# scripts/oneshot/run_llama3.1_8b_prune_tp8.sh runs this with LLaMA-3.1-8B's paths.
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/../lib.sh"

METHOD_ARG=${1:-}
DENSE_CKPT=${DENSE_CKPT:-assets/checkpoints/llama3_8b_hf}                            # HF directory or our checkpoint
CALIB_DATA=${CALIB_DATA:-assets/data/c4_llama3_pretokenized/c4_00000_text_document}  # .bin/.idx prefix or a text file
OUTPUT_ROOT=${OUTPUT_ROOT:-checkpoints/llama3-8b-oneshot}
TP=8
N=2
M=4
HESSIAN_SAMPLES=${HESSIAN_SAMPLES:-128}
SEQ_LENGTH=${SEQ_LENGTH:-4096}
SEED=${SEED:-1234}
DTYPE=bf16                      # compute dtype; calibration statistics are accumulated in float64
NPROC_PER_NODE=${NPROC_PER_NODE:-$TP}
DISTRIBUTED_ARGS="--nnodes 1 --node_rank 0 --nproc_per_node $NPROC_PER_NODE --master_addr ${MASTER_ADDR:-127.0.0.1} --master_port ${MASTER_PORT:-6000}"

case "$METHOD_ARG" in
  hessian)   METHOD=sparsegpt; EXTRA=(--update-weight) ;;
  magnitude) METHOD=magnitude; EXTRA=() ;;
  wanda)     METHOD=wanda;     EXTRA=() ;;
  *) echo "usage: $0 {hessian|magnitude|wanda}" >&2; exit 2 ;;
esac
shift
SAVE=$OUTPUT_ROOT/${METHOD_ARG}_${N}_${M}

cd "$ROOT"
if [ -f "$DENSE_CKPT/config.json" ]; then
  require_tokenizer "$DENSE_CKPT" DENSE_CKPT       # the Hugging Face directory brings tokenizer.json
else
  require_checkpoint "$DENSE_CKPT" DENSE_CKPT
fi
if [ "$METHOD" != magnitude ]; then
  if [ -f "$CALIB_DATA" ]; then :; else require_dataset "$CALIB_DATA" CALIB_DATA; fi
fi
end_checks
[ ! -e "$SAVE/latest_checkpointed_iteration.txt" ] || [ "${OVERWRITE:-0}" = 1 ] \
  || die "$SAVE already holds a checkpoint (OVERWRITE=1 replaces it, or set OUTPUT_ROOT=...)"
[ "${OVERWRITE:-0}" = 1 ] && EXTRA+=(--overwrite)

torchrun $DISTRIBUTED_ARGS tools/prune_oneshot.py \
  --load "$DENSE_CKPT" --method $METHOD --N $N --M $M \
  --calib-data "$CALIB_DATA" --hessian-samples $HESSIAN_SAMPLES --seq-length $SEQ_LENGTH --seed $SEED \
  --tensor-model-parallel-size $TP --dtype $DTYPE --save "$SAVE" "${EXTRA[@]}" "$@"
