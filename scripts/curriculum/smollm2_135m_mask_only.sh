#!/usr/bin/env bash
# MaskLLM through a curriculum: learn 2:4 masks of SmolLM2-135M (weights frozen) through the
# stages of CURRICULUM (sequence length 64 -> 2048, global batch 256 -> 8, LR scale 11.3 -> 0.3).
#
#   bash run_maskllm_native.sh scripts/curriculum/smollm2_135m_mask_only.sh 0   # start
#   bash run_maskllm_native.sh scripts/curriculum/smollm2_135m_mask_only.sh 1   # resume
#
# 0: SMOLLM2_CKPT's weights (--finetune), mask logits initialised from the SparseGPT one-shot
#    masks of PRIOR_CKPT (--prior-strength 3); PRIOR_STRENGTH=0 learns without a prior.
# 1: continue this run's own latest checkpoint in SAVE_DIR, at its place in the plan.
# The inputs are those of scripts/learnable_sparsity/smollm2_135m_mask_only.sh (the MaskLLM
# recipe without stages); the curriculum, micro-batch, evaluation and early-stop variables
# are those of scripts/curriculum/smollm2_135m_dense.sh. The mask logits learn at LR x LR_MULT
# x the stage's scale; the Gumbel temperature and scale follow the whole run. Any variable in
# capitals can be set from the environment; extra arguments go to the trainer.
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/../lib.sh"
parse_resume "${1:-}"
shift

DATA_PATH=${DATA_PATH:-output/data/smollm2/python_docs_text_document}
EVAL_DATA_PATH=${EVAL_DATA_PATH:-}                                 # optional second held-out set
DATA_CACHE_PATH=${DATA_CACHE_PATH:-output/cache}
SMOLLM2_CKPT=${SMOLLM2_CKPT:-output/checkpoints/smollm2-135m}
PRIOR_CKPT=${PRIOR_CKPT:-output/checkpoints/smollm2-135m-oneshot/sparsegpt_2_4}
CURRICULUM=${CURRICULUM:-scripts/curriculum/smollm2_135m_stages.yaml}

TAG=${TAG:-smollm2-135m-mask-only-curriculum}
MODEL=smollm2-135m
TP=${TP:-1}
MICRO_BATCH_SIZE=${MICRO_BATCH_SIZE:-auto}                         # or a number for every stage
MEMORY_TARGET_FRACTION=${MEMORY_TARGET_FRACTION:-0.9}
TRAIN_ITERS=${TRAIN_ITERS:-3000}
WARMUP_ITERS=${WARMUP_ITERS:-0}
LR=${LR:-5e-5}                                                      # x the stage's lr_scale
MIN_LR=${MIN_LR:-5e-6}
SAVE_INTERVAL=${SAVE_INTERVAL:-250}
LOG_INTERVAL=${LOG_INTERVAL:-10}
EVAL_INTERVAL=${EVAL_INTERVAL:-50}
EVAL_ITERS=${EVAL_ITERS:-10}
EVAL_SEQ_LENGTH=${EVAL_SEQ_LENGTH:-2048}                           # comparable across stages
EARLY_STOP_PATIENCE=${EARLY_STOP_PATIENCE-10}                      # evaluations; empty: no early stop
EARLY_STOP_MIN_DELTA=${EARLY_STOP_MIN_DELTA:-0.001}
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
require_file "$CURRICULUM" CURRICULUM
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
STOP_ARGS=""
[ -z "$EARLY_STOP_PATIENCE" ] || STOP_ARGS="--early-stop-patience $EARLY_STOP_PATIENCE --early-stop-min-delta $EARLY_STOP_MIN_DELTA"
mkdir -p "$SAVE_DIR" "$RUN_DIR/logs"

torchrun $DISTRIBUTED_ARGS pretrain_maskllm.py \
  --model $MODEL --tensor-model-parallel-size $TP $PRECISION_ARGS \
  --curriculum $CURRICULUM --micro-batch-size $MICRO_BATCH_SIZE --memory-target-fraction $MEMORY_TARGET_FRACTION \
  --train-iters $TRAIN_ITERS --lr $LR --min-lr $MIN_LR --lr-decay-style cosine --lr-warmup-iters $WARMUP_ITERS \
  --weight-decay 0.1 --adam-beta1 0.9 --adam-beta2 0.95 --adam-eps 1e-5 --clip-grad 1.0 \
  --data-path $DATA_PATH --split 98,2,0 --data-cache-path $DATA_CACHE_PATH $EVAL_ARGS \
  $LOAD_ARGS --save $SAVE_DIR --save-interval $SAVE_INTERVAL --keep-last $KEEP_LAST --save-best \
  --log-interval $LOG_INTERVAL --eval-interval $EVAL_INTERVAL --eval-iters $EVAL_ITERS \
  --eval-seq-length $EVAL_SEQ_LENGTH $STOP_ARGS \
  --exit-signal-handler --tag $TAG --log-dir $RUN_DIR/logs \
  --mask-only --N $N --M $M --gumbel-temperature-range $GUMBEL_TEMPERATURE --gumbel-scale-range $GUMBEL_SCALE \
  $PRIOR_ARGS --lr-mult $LR_MULT --weight-reg $WEIGHT_REG "$@"
