#!/usr/bin/env bash
# MaskLLM incremental mask learning: LLaMA-3-8B 2:4 masks learned on C4, adapted to
# WikiText-103, tensor-parallel 8 (weights frozen).
#
#   bash run_maskllm_native.sh scripts/incremental/llama3_8b_mask_only_wikitext103_tp8.sh 0   # start
#   bash run_maskllm_native.sh scripts/incremental/llama3_8b_mask_only_wikitext103_tp8.sh 1   # resume
#
# 0: weights and mask logits of the C4 run (scripts/learnable_sparsity/llama3_8b_mask_only_tp8_c4.sh)
#    with --finetune (iteration, optimizer and data start fresh): the learned logits are the
#    starting point and the temperature restarts lower (2 -> 0.05) so they can move again.
#    PRIOR_STRENGTH=S > 0 also re-injects the C4 masks as a prior on top of the loaded logits; at
#    S=3 that saturated them in the SmolLM2 study (no group flipped in 48 steps;
#    benchmarks/RESULTS.md, "Incremental"), hence the default 0.
# 1: continue this run's own latest checkpoint in SAVE_DIR.
# The tokenizer is LLaMA-3's tokenizer.json from the Hugging Face directory. MICRO_BATCH_SIZE=auto
# picks the largest micro-batch that fits. Paths are relative to the repository root; any
# variable in capitals below can be set from the environment. Extra arguments go to the trainer.
# scripts/incremental/llama3.1_8b_mask_only_wikitext103_tp8.sh runs this recipe with
# LLaMA-3.1-8B's model, Hugging Face directory and names.
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/../lib.sh"
parse_resume "${1:-}"
shift

# Data: WikiText-103 train, one document per article (scripts/data/prepare_wikitext103_llama3.sh)
WIKI_HOME=${WIKI_HOME:-assets/data/wikitext103_llama3_pretokenized}
TOKENIZER_NAME=${TOKENIZER_NAME:-llama3}                                   # <name> in wiki_train_<name>_text_document
DATA_BLEND="1.0 ${WIKI_HOME}/wiki_train_${TOKENIZER_NAME}_text_document"
DATA_CACHE_PATH=${DATA_CACHE_PATH:-output/cache}

# Checkpoints
C4_MASK_CKPT=${C4_MASK_CKPT:-output/checkpoints/llama3-8b-tp8-mask-only-c4/train_iters_2000/ckpt}
LLAMA3_HF=${LLAMA3_HF:-assets/checkpoints/llama3_8b_hf}                    # the Hugging Face directory: tokenizer
HF_VAR=${HF_VAR:-LLAMA3_HF}                                                # the variable the messages name for it

# Task
TAG=${TAG:-llama3-8b-tp8-mask-only-wikitext103-c4format}
MODEL=${MODEL:-llama3-8b}
TP=8
SEQ_LENGTH=2048
MICRO_BATCH_SIZE=${MICRO_BATCH_SIZE:-auto}   # the largest that fits (MEMORY_TARGET_FRACTION of the GPU), or a number
MEMORY_TARGET_FRACTION=${MEMORY_TARGET_FRACTION:-0.9}                      # for auto
GLOBAL_BATCH_SIZE=${GLOBAL_BATCH_SIZE:-64}
TRAIN_ITERS=${TRAIN_ITERS:-800}
WARMUP_ITERS=80
LR=2e-5
MIN_LR=2e-6
SAVE_INTERVAL=${SAVE_INTERVAL:-200}
LOG_INTERVAL=10
EVAL_INTERVAL=40
EVAL_ITERS=5

# MaskLLM
N=2
M=4
GUMBEL_TEMPERATURE="2 0.05"
GUMBEL_SCALE="1e2 5e2"
PRIOR_STRENGTH=${PRIOR_STRENGTH:-0}      # 0: the loaded logits as learned (see the header)
LR_MULT=10
WEIGHT_REG=1e-5

RUN_DIR=${RUN_DIR:-output/checkpoints/$TAG/train_iters_$TRAIN_ITERS}
SAVE_DIR=$RUN_DIR/ckpt

cd "$ROOT"
# --- checks before the launch ------------------------------------------------------------------
require_blend "$DATA_BLEND" WIKI_HOME
require_tokenizer "$LLAMA3_HF" "$HF_VAR"
require_checkpoint "$C4_MASK_CKPT" C4_MASK_CKPT
if [ "$RESUME" = 0 ]; then
  refuse_existing_run "$SAVE_DIR" SAVE_DIR
  LOAD_ARGS="--load $C4_MASK_CKPT --finetune"
else
  require_checkpoint "$SAVE_DIR" SAVE_DIR
  LOAD_ARGS="--load $SAVE_DIR --exit-on-missing-checkpoint"
fi
PRIOR_ARGS=""
if ! [[ "$PRIOR_STRENGTH" =~ ^0+(\.0*)?$ ]]; then   # re-inject the loaded masks as a prior
  PRIOR_ARGS="--prior-mask $C4_MASK_CKPT --prior-strength $PRIOR_STRENGTH"
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
  $PRIOR_ARGS --lr-mult $LR_MULT --weight-reg $WEIGHT_REG "$@"
