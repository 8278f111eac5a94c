#!/usr/bin/env bash
# MaskLLM incremental mask learning on a real small model: SmolLM2-135M 2:4 masks learned on
# the general corpus, adapted to the Python documentation (weights frozen). The SmolLM2
# version of scripts/incremental/llama2_7b_mask_only_wikitext103_tp4.sh: the same structure
# and flags, sizes scaled (sequence 2048 -> 1024, global batch 64 -> 32, 800 -> 64 iterations,
# warmup 80 -> 6, evaluation every 40 -> 8 iterations).
#
#   bash run_maskllm_native.sh scripts/incremental/smollm2_135m_mask_only_python_docs.sh 0   # start
#   bash run_maskllm_native.sh scripts/incremental/smollm2_135m_mask_only_python_docs.sh 1   # resume
#
# 0: weights and mask logits of the general run (scripts/learnable_sparsity/smollm2_135m_mask_only.sh
#    on the general corpus) with --finetune (iteration, optimizer and data start fresh): the learned
#    logits are the starting point and the temperature restarts lower (2 -> 0.05) so they can move
#    again. PRIOR_STRENGTH=S > 0 also re-injects the general masks as a prior, adding S standard
#    deviations of the *trained* logits: at 3, a 48-step run never flipped a group
#    (benchmarks/RESULTS.md, "Incremental"), hence the default 0.
# 1: continue this run's own latest checkpoint in SAVE_DIR.
# Every evaluation interval reports two held-out sets side by side: the domain's validation
# split and the general corpus's validation set (EVAL_DATA_PATH), so forgetting shows during
# the run. Data: scripts/data/prepare_smollm2_study_corpora.sh. The tokenizer comes with the
# checkpoint. Paths are relative to the repository root; any variable in capitals below can be
# set from the environment. Extra arguments go to the trainer.
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/../lib.sh"
parse_resume "${1:-}"
shift

# Data: the Python docs minus their held-out files, and the general validation set
DATA_HOME=${DATA_HOME:-output/data/smollm2_study}
DATA_BLEND=${DATA_BLEND:-"1.0 ${DATA_HOME}/python_docs_train_text_document"}
EVAL_DATA_PATH=${EVAL_DATA_PATH:-${DATA_HOME}/general_val_text_document}
DATA_CACHE_PATH=${DATA_CACHE_PATH:-output/cache}

# Checkpoints
GENERAL_MASK_CKPT=${GENERAL_MASK_CKPT:-output/checkpoints/smollm2-135m-mask-only-general/train_iters_192/ckpt}

# Task
TAG=${TAG:-smollm2-135m-mask-only-python-docs}
MODEL=smollm2-135m
TP=${TP:-1}
SEQ_LENGTH=${SEQ_LENGTH:-1024}
MICRO_BATCH_SIZE=${MICRO_BATCH_SIZE:-16}
GLOBAL_BATCH_SIZE=${GLOBAL_BATCH_SIZE:-32}
TRAIN_ITERS=${TRAIN_ITERS:-64}
WARMUP_ITERS=${WARMUP_ITERS:-6}
LR=${LR:-2e-5}
MIN_LR=${MIN_LR:-2e-6}
SAVE_INTERVAL=${SAVE_INTERVAL:-32}
LOG_INTERVAL=${LOG_INTERVAL:-4}
EVAL_INTERVAL=${EVAL_INTERVAL:-8}
EVAL_ITERS=${EVAL_ITERS:-2}
SEED=${SEED:-1234}

# MaskLLM
N=2
M=4
GUMBEL_TEMPERATURE=${GUMBEL_TEMPERATURE:-"2 0.05"}
GUMBEL_SCALE=${GUMBEL_SCALE:-"1e2 5e2"}
PRIOR_STRENGTH=${PRIOR_STRENGTH:-0}      # 0: the loaded logits as learned (see the header)
LR_MULT=${LR_MULT:-10}
WEIGHT_REG=${WEIGHT_REG:-1e-5}

RUN_DIR=${RUN_DIR:-output/checkpoints/$TAG/train_iters_$TRAIN_ITERS}
SAVE_DIR=$RUN_DIR/ckpt
# bf16 on GPUs (the launcher says which), fp32 on the CPU
PRECISION_ARGS=""
[ "${MEGATRON_EXT_BACKEND:-}" != nccl ] || PRECISION_ARGS="--bf16"

cd "$ROOT"
# --- checks before the launch ------------------------------------------------------------------
require_blend "$DATA_BLEND" DATA_HOME
require_blend "$EVAL_DATA_PATH" EVAL_DATA_PATH
require_checkpoint "$GENERAL_MASK_CKPT" GENERAL_MASK_CKPT
if [ "$RESUME" = 0 ]; then
  refuse_existing_run "$SAVE_DIR" SAVE_DIR
  LOAD_ARGS="--load $GENERAL_MASK_CKPT --finetune"
else
  require_checkpoint "$SAVE_DIR" SAVE_DIR
  LOAD_ARGS="--load $SAVE_DIR --exit-on-missing-checkpoint"
fi
PRIOR_ARGS=""
if ! [[ "$PRIOR_STRENGTH" =~ ^0+(\.0*)?$ ]]; then   # re-inject the loaded masks as a prior
  PRIOR_ARGS="--prior-mask $GENERAL_MASK_CKPT --prior-strength $PRIOR_STRENGTH"
fi
end_checks
mkdir -p "$SAVE_DIR" "$RUN_DIR/logs"

echo "data: $DATA_BLEND; also evaluated on: $EVAL_DATA_PATH"
torchrun $DISTRIBUTED_ARGS pretrain_maskllm.py \
  --model $MODEL --tensor-model-parallel-size $TP $PRECISION_ARGS \
  --seq-length $SEQ_LENGTH --micro-batch-size $MICRO_BATCH_SIZE --global-batch-size $GLOBAL_BATCH_SIZE \
  --train-iters $TRAIN_ITERS --lr $LR --min-lr $MIN_LR --lr-decay-style cosine --lr-warmup-iters $WARMUP_ITERS \
  --weight-decay 0.1 --adam-beta1 0.9 --adam-beta2 0.95 --adam-eps 1e-5 --clip-grad 1.0 --seed $SEED \
  --data-path $DATA_BLEND --split 98,2,0 --data-cache-path $DATA_CACHE_PATH --eval-data-path $EVAL_DATA_PATH \
  $LOAD_ARGS --save $SAVE_DIR --save-interval $SAVE_INTERVAL \
  --log-interval $LOG_INTERVAL --eval-interval $EVAL_INTERVAL --eval-iters $EVAL_ITERS \
  --log-num-zeros-in-grad --exit-signal-handler --tag $TAG --log-dir $RUN_DIR/logs \
  --mask-only --N $N --M $M --gumbel-temperature-range $GUMBEL_TEMPERATURE --gumbel-scale-range $GUMBEL_SCALE \
  $PRIOR_ARGS --lr-mult $LR_MULT --weight-reg $WEIGHT_REG "$@"
