#!/usr/bin/env bash
# The training job of benchmarks/bench_multi_gpu.py (kill and resume, resharding, two nodes):
# the settings of the seed's incremental script (scripts/incremental/llama2_7b_mask_only_wikitext103_tp4.sh:
# mask-only 2:4, its LR, Gumbel ranges, regulariser, clipping, bf16) on a randomly initialised
# model, because the seed's scripts start from the real LLaMA-2-7B checkpoints.
#
#   bash run_maskllm_native.sh benchmarks/multi_gpu_train.sh 0|1 [extra trainer args]
#
# 0: a fresh run into SAVE_DIR (which must hold no checkpoint); 1: resume SAVE_DIR (at any TP x DP).
# Settings come from the environment (the driver sets DATA_PREFIX, TOKENIZER_MODEL, SAVE_DIR).
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/../scripts/lib.sh"
parse_resume "${1:-}"
shift

MODEL_ARGS=${MODEL_ARGS:-"--model llama2-7b"}
DTYPE_ARGS=${DTYPE_ARGS-"--bf16"}
TP=${TP:-4}
SEQ_LENGTH=${SEQ_LENGTH:-2048}
MICRO_BATCH_SIZE=${MICRO_BATCH_SIZE:-auto}
GLOBAL_BATCH_SIZE=${GLOBAL_BATCH_SIZE:-64}
TRAIN_ITERS=${TRAIN_ITERS:-12}
SAVE_INTERVAL=${SAVE_INTERVAL:-4}
WARMUP_ITERS=${WARMUP_ITERS:-2}
LR=2e-5
MIN_LR=2e-6
TAG=${TAG:-multi-gpu}

# MaskLLM, as the incremental script
GUMBEL_TEMPERATURE="2 0.05"
GUMBEL_SCALE="1e2 5e2"

DATA_PREFIX=${DATA_PREFIX:-}
TOKENIZER_MODEL=${TOKENIZER_MODEL:-}
SAVE_DIR=${SAVE_DIR:-}
LOG_DIR_RUN=${LOG_DIR_RUN:-${SAVE_DIR}/logs}

require_dataset "$DATA_PREFIX" DATA_PREFIX
require_tokenizer "$TOKENIZER_MODEL" TOKENIZER_MODEL
[ -n "$SAVE_DIR" ] || _check_failed "SAVE_DIR is not set"
if [ "$RESUME" = 0 ]; then
  refuse_existing_run "$SAVE_DIR" SAVE_DIR
else
  require_checkpoint "$SAVE_DIR" SAVE_DIR
fi
end_checks

torchrun $DISTRIBUTED_ARGS "$ROOT/pretrain_maskllm.py" $MODEL_ARGS --tensor-model-parallel-size $TP $DTYPE_ARGS \
  --seq-length $SEQ_LENGTH --micro-batch-size $MICRO_BATCH_SIZE --global-batch-size $GLOBAL_BATCH_SIZE \
  --train-iters $TRAIN_ITERS --lr $LR --min-lr $MIN_LR --lr-decay-style cosine --lr-warmup-iters $WARMUP_ITERS \
  --weight-decay 0.1 --adam-beta1 0.9 --adam-beta2 0.95 --adam-eps 1e-5 --clip-grad 1.0 --init-method-std 0.014 \
  --data-path $DATA_PREFIX --split 98,2,0 --tokenizer-type Llama2Tokenizer --tokenizer-model $TOKENIZER_MODEL \
  --load $SAVE_DIR --save $SAVE_DIR --save-interval $SAVE_INTERVAL --seed 1234 \
  --log-interval 1 --eval-interval 1000000 --eval-iters 0 --exit-signal-handler --log-dir $LOG_DIR_RUN --tag $TAG \
  --mask-only --N 2 --M 4 --gumbel-temperature-range $GUMBEL_TEMPERATURE --gumbel-scale-range $GUMBEL_SCALE \
  --lr-mult 10 --weight-reg 1e-5 "$@"
