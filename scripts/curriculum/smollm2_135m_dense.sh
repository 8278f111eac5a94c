#!/usr/bin/env bash
# Curriculum continued pretraining of SmolLM2-135M (dense: every weight trained) through the
# stages of CURRICULUM (sequence length 64 -> 2048, global batch 256 -> 8, LR scale 11.3 -> 0.3).
#
#   bash run_maskllm_native.sh scripts/curriculum/smollm2_135m_dense.sh 0   # start
#   bash run_maskllm_native.sh scripts/curriculum/smollm2_135m_dense.sh 1   # resume
#
# 0: SMOLLM2_CKPT's weights (--finetune: iteration, optimizer and data start fresh).
# 1: continue this run's own latest checkpoint in SAVE_DIR, at its place in the plan.
# Inputs, made with the tools (as for scripts/learnable_sparsity/smollm2_135m_mask_only.sh):
#   SMOLLM2_CKPT  tools/convert_checkpoint.py --source-format gguf --target-format megatron \
#                     --load SmolLM2-135M.gguf --save $SMOLLM2_CKPT
#   DATA_PATH     tools/preprocess_data.py --tokenizer-type HuggingFaceTokenizer \
#                     --tokenizer-model $SMOLLM2_CKPT/iter_0000000/tokenizer ... (a prefix or a blend)
# The tokenizer comes with the checkpoint. MICRO_BATCH_SIZE=auto (the default) picks, per stage,
# the largest micro-batch that fits MEMORY_TARGET_FRACTION of the device's memory; the
# stage's global batch is kept by gradient accumulation. Validation runs at each stage's
# length and at EVAL_SEQ_LENGTH, whose loss picks <SAVE_DIR>/best (--save-best) and stops the
# run after EARLY_STOP_PATIENCE evaluations without a drop of EARLY_STOP_MIN_DELTA (empty: never).
# The learning rate is LR times the stage's scale, on a cosine decay to MIN_LR. Any variable
# in capitals can be set from the environment; extra arguments go to the trainer.
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/../lib.sh"
parse_resume "${1:-}"
shift

DATA_PATH=${DATA_PATH:-output/data/smollm2/python_docs_text_document}
EVAL_DATA_PATH=${EVAL_DATA_PATH:-}                                 # optional second held-out set
DATA_CACHE_PATH=${DATA_CACHE_PATH:-output/cache}
SMOLLM2_CKPT=${SMOLLM2_CKPT:-output/checkpoints/smollm2-135m}
CURRICULUM=${CURRICULUM:-scripts/curriculum/smollm2_135m_stages.yaml}

TAG=${TAG:-smollm2-135m-dense-curriculum}
MODEL=smollm2-135m
TP=${TP:-1}
MICRO_BATCH_SIZE=${MICRO_BATCH_SIZE:-auto}                         # or a number for every stage
MEMORY_TARGET_FRACTION=${MEMORY_TARGET_FRACTION:-0.9}
TRAIN_ITERS=${TRAIN_ITERS:-3000}
WARMUP_ITERS=${WARMUP_ITERS:-30}
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
  --weight-decay 0.1 --adam-beta1 0.9 --adam-beta2 0.95 --adam-eps 1e-8 --clip-grad 1.0 \
  --data-path $DATA_PATH --split 98,2,0 --data-cache-path $DATA_CACHE_PATH $EVAL_ARGS \
  $LOAD_ARGS --save $SAVE_DIR --save-interval $SAVE_INTERVAL --keep-last $KEEP_LAST --save-best \
  --log-interval $LOG_INTERVAL --eval-interval $EVAL_INTERVAL --eval-iters $EVAL_ITERS \
  --eval-seq-length $EVAL_SEQ_LENGTH $STOP_ARGS \
  --exit-signal-handler --tag $TAG --log-dir $RUN_DIR/logs "$@"
