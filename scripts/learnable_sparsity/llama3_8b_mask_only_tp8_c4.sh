#!/usr/bin/env bash
# MaskLLM: learn 2:4 masks of LLaMA-3-8B on 20 C4 shards, tensor-parallel 8 (weights frozen).
#
#   bash run_maskllm_native.sh scripts/learnable_sparsity/llama3_8b_mask_only_tp8_c4.sh 0   # start
#   bash run_maskllm_native.sh scripts/learnable_sparsity/llama3_8b_mask_only_tp8_c4.sh 1   # resume
#
# 0: the dense checkpoint's weights (--finetune: iteration, optimizer and data start fresh),
#    mask logits initialised from the SparseGPT one-shot masks (--prior-strength 3).
# 1: continue this run's own latest checkpoint in SAVE_DIR.
# LLaMA-3-8B: 128k vocabulary, 8 query groups (grouped-query attention), rotary base 5e5;
# the tokenizer is tokenizer.json of the Hugging Face directory (HuggingFaceTokenizer). The
# hyperparameters are those MaskLLM ships for it (global batch 256 x 4096 tokens, 2000
# iterations, TP 8). DENSE_CKPT is made from the Hugging Face directory with
#   tools/convert_checkpoint.py --source-format hf --target-format megatron \
#       --load $LLAMA3_HF --save $DENSE_CKPT --target-tp 8 --dtype bf16
# MICRO_BATCH_SIZE=auto picks the largest micro-batch that fits
# (MEMORY_TARGET_FRACTION of the device's memory). Paths are relative to the repository
# root; any variable in capitals below can be set from the environment. Extra arguments go
# to the trainer. scripts/learnable_sparsity/llama3.1_8b_mask_only_tp8_c4.sh runs this recipe
# with LLaMA-3.1-8B's model, Hugging Face directory and names.
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/../lib.sh"
parse_resume "${1:-}"
shift

# Data: 20 C4 shards (scripts/data/prepare_c4_llama3.sh), 5% each
C4_HOME=${C4_HOME:-assets/data/c4_llama3_pretokenized}
DATA_BLEND=""
for i in $(seq -f "%05g" 0 19); do
  DATA_BLEND="${DATA_BLEND} 0.05 ${C4_HOME}/c4_${i}_text_document"
done
DATA_BLEND=${DATA_BLEND# }
DATA_CACHE_PATH=${DATA_CACHE_PATH:-output/cache}

# Checkpoints
LLAMA3_HF=${LLAMA3_HF:-assets/checkpoints/llama3_8b_hf}                    # the Hugging Face directory: tokenizer
HF_VAR=${HF_VAR:-LLAMA3_HF}                                                # the variable the messages name for it
DENSE_CKPT=${DENSE_CKPT:-checkpoints/llama3-8b-tp8}                        # from LLAMA3_HF, see above
PRIOR_CKPT=${PRIOR_CKPT:-checkpoints/llama3-8b-oneshot/hessian_2_4}        # scripts/oneshot/run_llama3_8b_prune_tp8.sh hessian

# Task
TAG=${TAG:-llama3-8b-tp8-mask-only-c4}
MODEL=${MODEL:-llama3-8b}
TP=8
SEQ_LENGTH=4096
MICRO_BATCH_SIZE=${MICRO_BATCH_SIZE:-auto}   # the largest that fits (MEMORY_TARGET_FRACTION of the GPU), or a number
MEMORY_TARGET_FRACTION=${MEMORY_TARGET_FRACTION:-0.9}                      # for auto
GLOBAL_BATCH_SIZE=${GLOBAL_BATCH_SIZE:-256}
TRAIN_ITERS=${TRAIN_ITERS:-2000}
WARMUP_ITERS=0
LR=5e-5
MIN_LR=5e-6
SAVE_INTERVAL=${SAVE_INTERVAL:-100}
LOG_INTERVAL=10
EVAL_INTERVAL=100
EVAL_ITERS=10

# MaskLLM
N=2
M=4
GUMBEL_TEMPERATURE="4 0.05"
GUMBEL_SCALE="1e2 5e2"
PRIOR_STRENGTH=3.0
LR_MULT=10
WEIGHT_REG=1e-5

RUN_DIR=${RUN_DIR:-output/checkpoints/$TAG/train_iters_$TRAIN_ITERS}
SAVE_DIR=$RUN_DIR/ckpt

cd "$ROOT"
# --- checks before the launch ------------------------------------------------------------------
require_blend "$DATA_BLEND" C4_HOME
require_tokenizer "$LLAMA3_HF" "$HF_VAR"
require_checkpoint "$PRIOR_CKPT" PRIOR_CKPT
if [ "$RESUME" = 0 ]; then
  require_checkpoint "$DENSE_CKPT" DENSE_CKPT
  refuse_existing_run "$SAVE_DIR" SAVE_DIR
  LOAD_ARGS="--load $DENSE_CKPT --finetune"
else
  require_checkpoint "$SAVE_DIR" SAVE_DIR
  LOAD_ARGS="--load $SAVE_DIR --exit-on-missing-checkpoint"
fi
end_checks
mkdir -p "$SAVE_DIR" "$RUN_DIR/logs"

echo "data: $DATA_BLEND"
torchrun $DISTRIBUTED_ARGS pretrain_maskllm.py \
  --model $MODEL --tensor-model-parallel-size $TP --bf16 \
  --seq-length $SEQ_LENGTH --micro-batch-size $MICRO_BATCH_SIZE --memory-target-fraction $MEMORY_TARGET_FRACTION \
  --global-batch-size $GLOBAL_BATCH_SIZE \
  --train-iters $TRAIN_ITERS --lr $LR --min-lr $MIN_LR --lr-decay-style cosine --lr-warmup-iters $WARMUP_ITERS \
  --weight-decay 0.1 --adam-beta1 0.9 --adam-beta2 0.95 --adam-eps 1e-5 --clip-grad 1.0 --init-method-std 0.014 \
  --data-path $DATA_BLEND --split 98,2,0 --data-cache-path $DATA_CACHE_PATH \
  --tokenizer-type HuggingFaceTokenizer --tokenizer-model $LLAMA3_HF \
  $LOAD_ARGS --save $SAVE_DIR --save-interval $SAVE_INTERVAL \
  --log-interval $LOG_INTERVAL --eval-interval $EVAL_INTERVAL --eval-iters $EVAL_ITERS \
  --log-num-zeros-in-grad --exit-signal-handler --tag $TAG --log-dir $RUN_DIR/logs \
  --mask-only --N $N --M $M --gumbel-temperature-range $GUMBEL_TEMPERATURE --gumbel-scale-range $GUMBEL_SCALE \
  --prior-mask $PRIOR_CKPT --prior-strength $PRIOR_STRENGTH --lr-mult $LR_MULT --weight-reg $WEIGHT_REG "$@"
