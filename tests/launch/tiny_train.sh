#!/usr/bin/env bash
# A small training script for the launcher tests, written as the real ones are: checks
# first, then one torchrun line. The tiny LLaMA on a tokenized sample; settings from the
# environment (the tests set DATA_PREFIX, TOKENIZER_MODEL, SAVE_DIR, LOG_DIR_RUN).
#
#   bash run_maskllm_native.sh tests/launch/tiny_train.sh 0|1
#
# 0: a fresh run into SAVE_DIR (which must hold no checkpoint); 1: resume SAVE_DIR.
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/../../scripts/lib.sh"
parse_resume "${1:-}"
shift

TP=${TP:-1}
TRAIN_ITERS=${TRAIN_ITERS:-8}
SAVE_INTERVAL=${SAVE_INTERVAL:-2}
SEQ_LENGTH=${SEQ_LENGTH:-64}
MICRO_BATCH_SIZE=${MICRO_BATCH_SIZE:-2}
GLOBAL_BATCH_SIZE=${GLOBAL_BATCH_SIZE:-4}
MODEL_ARGS=${MODEL_ARGS:-"--model tiny"}

DATA_PREFIX=${DATA_PREFIX:-}
TOKENIZER_MODEL=${TOKENIZER_MODEL:-}
SAVE_DIR=${SAVE_DIR:-}

require_dataset "$DATA_PREFIX" DATA_PREFIX
require_tokenizer "$TOKENIZER_MODEL" TOKENIZER_MODEL
[ -n "$SAVE_DIR" ] || _check_failed "SAVE_DIR is not set"
if [ "$RESUME" = 0 ]; then
  refuse_existing_run "$SAVE_DIR" SAVE_DIR
else
  require_checkpoint "$SAVE_DIR" SAVE_DIR
fi
end_checks

torchrun $DISTRIBUTED_ARGS "$ROOT/pretrain_maskllm.py" $MODEL_ARGS --tensor-model-parallel-size $TP \
  --seq-length $SEQ_LENGTH --micro-batch-size $MICRO_BATCH_SIZE --global-batch-size $GLOBAL_BATCH_SIZE \
  --train-iters $TRAIN_ITERS --lr 3e-3 --min-lr 3e-4 --lr-decay-style cosine --lr-warmup-iters 1 \
  --data-path $DATA_PREFIX --split 98,2,0 --tokenizer-type Llama2Tokenizer --tokenizer-model $TOKENIZER_MODEL \
  --load $SAVE_DIR --save $SAVE_DIR --save-interval $SAVE_INTERVAL \
  --log-interval 1 --eval-interval 1000 --eval-iters 0 --log-dir ${LOG_DIR_RUN:-$SAVE_DIR/logs} --tag tiny "$@"
