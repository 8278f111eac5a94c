#!/usr/bin/env bash
# The whole MaskLLM method on the shipped sample (what `make demo` runs), on two CPU cores in
# about 8 minutes, plus the install on a first `make demo`:
#
#   bash run_maskllm_native.sh examples/quickstart.sh 0     # 0: from scratch, 1: resume
#
#   1. tokenize the shipped Shakespeare plays (examples/data) with the shipped tokenizer;
#   2. pretrain a small dense LLaMA on them, tensor-parallel 2;
#   3. SparseGPT 2:4 one-shot pruning of it: the prior masks (tools/prune_oneshot.py);
#   4. MaskLLM: learn 2:4 masks of the frozen dense weights, tensor-parallel 2, the mask
#      logits started from the SparseGPT masks (--prior-strength);
#   5. perplexity on the held-out play (The Tempest) of the dense model, the SparseGPT
#      model and the learned masks (tools/eval_ppl.py);
#   6. Hugging Face export with the learned masks baked in, checked 2:4 (tools/check_sparsity.py).
#
# Writes OUT/results.json: {"dense", "prior", "learned"} perplexities and the export path.
# With 1, finished stages are kept and an interrupted training stage resumes from its own
# latest checkpoint. Any variable in capitals below can be set from the environment.
set -euo pipefail
NPROC_PER_NODE=${NPROC_PER_NODE:-2}   # run without the launcher: one node, two processes
. "$(dirname "${BASH_SOURCE[0]}")/../scripts/lib.sh"
parse_resume "${1:-}"
shift

OUT=${OUT:-output/quickstart}
SAMPLE=examples/data
TOKENIZER_MODEL=$SAMPLE/tokenizer.model
TRAIN_JSONL=$SAMPLE/shakespeare_train.jsonl
HELDOUT_TEXT=$SAMPLE/shakespeare_heldout.txt

# Model: a small LLaMA (4 layers, hidden 128, the sample's 2,000-token vocabulary)
TP=2
MODEL_ARGS="--model tiny --num-layers 4 --hidden-size 128 --ffn-hidden-size 384 --num-attention-heads 4 --num-query-groups 2"
SEQ_LENGTH=${SEQ_LENGTH:-128}
GLOBAL_BATCH_SIZE=${GLOBAL_BATCH_SIZE:-16}

# Dense pretraining
DENSE_ITERS=${DENSE_ITERS:-300}
DENSE_LR=${DENSE_LR:-3e-3}
DENSE_MIN_LR=${DENSE_MIN_LR:-3e-4}

# SparseGPT prior
HESSIAN_SAMPLES=${HESSIAN_SAMPLES:-64}

# MaskLLM
MASK_ITERS=${MASK_ITERS:-100}
MASK_LR=${MASK_LR:-5e-3}
MASK_MIN_LR=${MASK_MIN_LR:-5e-4}
N=2
M=4
GUMBEL_TEMPERATURE=${GUMBEL_TEMPERATURE:-"4 0.05"}
GUMBEL_SCALE=${GUMBEL_SCALE:-"1e2 5e2"}
PRIOR_STRENGTH=${PRIOR_STRENGTH:-3.0}
WEIGHT_REG=${WEIGHT_REG:-1e-5}

DATA_PREFIX=$OUT/data/shakespeare_text_document
DENSE_DIR=$OUT/dense
PRIOR_DIR=$OUT/sparsegpt_2_4
MASK_DIR=$OUT/maskllm_2_4
HF_DIR=$OUT/hf_maskllm_2_4

cd "$ROOT"
require_file "$TRAIN_JSONL" TRAIN_JSONL
require_file "$HELDOUT_TEXT" HELDOUT_TEXT
require_tokenizer "$TOKENIZER_MODEL" TOKENIZER_MODEL
end_checks
WORLD=${WORLD_SIZE_TOTAL:-$(( ${NNODES:-1} * NPROC_PER_NODE ))}
[ $(( WORLD % TP )) -eq 0 ] || die "the quickstart uses tensor-parallel size $TP: NPROC_PER_NODE x NNODES = $WORLD processes is not a multiple (set NPROC_PER_NODE=2)"
DP=$(( WORLD / TP ))
[ $(( GLOBAL_BATCH_SIZE % DP )) -eq 0 ] || die "GLOBAL_BATCH_SIZE $GLOBAL_BATCH_SIZE is not divisible by the data-parallel size $DP"
MICRO_BATCH_SIZE=$(( GLOBAL_BATCH_SIZE / DP ))

if [ "$RESUME" = 0 ]; then   # start over: remove what an earlier run wrote
  rm -rf "$OUT/data" "$OUT/cache" "$OUT/logs" "$DENSE_DIR" "$PRIOR_DIR" "$MASK_DIR" "$HF_DIR" "$HF_DIR.masks" \
    "$OUT/results.json"
fi
mkdir -p "$OUT/data" "$OUT/logs"
SECONDS=0
stage() { echo; echo "== [$(printf '%3d' "$SECONDS") s] $*"; }
finished() {  # finished DIR ITERS: DIR holds the checkpoint of iteration ITERS
  [ -f "$1/latest_checkpointed_iteration.txt" ] && [ "$(cat "$1/latest_checkpointed_iteration.txt")" = "$2" ]
}

COMMON_ARGS="$MODEL_ARGS --tensor-model-parallel-size $TP --seq-length $SEQ_LENGTH \
  --micro-batch-size $MICRO_BATCH_SIZE --global-batch-size $GLOBAL_BATCH_SIZE \
  --data-path $DATA_PREFIX --split 98,2,0 --data-cache-path $OUT/cache \
  --tokenizer-type Llama2Tokenizer --tokenizer-model $TOKENIZER_MODEL \
  --weight-decay 0.1 --adam-beta1 0.9 --adam-beta2 0.95 --clip-grad 1.0 --lr-decay-style cosine \
  --log-dir $OUT/logs --seed 1234"

# 1. data ------------------------------------------------------------------------------------------
stage "1. tokenize $TRAIN_JSONL"
if [ -f "$DATA_PREFIX.bin" ] && [ -f "$DATA_PREFIX.idx" ]; then
  echo "kept $DATA_PREFIX"
else
  "$PYTHON" tools/preprocess_data.py --input "$TRAIN_JSONL" --output-prefix "$OUT/data/shakespeare" \
    --tokenizer-type Llama2Tokenizer --tokenizer-model "$TOKENIZER_MODEL" --append-eod --workers 2 \
    --log-interval 100000
fi
"$PYTHON" tools/check_dataset.py "$DATA_PREFIX"

# 2. dense pretraining -----------------------------------------------------------------------------
stage "2. pretrain a dense LLaMA, TP=$TP ($DENSE_ITERS iterations)"
if finished "$DENSE_DIR" "$DENSE_ITERS"; then
  echo "kept $DENSE_DIR"
else
  torchrun $DISTRIBUTED_ARGS pretrain_maskllm.py $COMMON_ARGS \
    --train-iters $DENSE_ITERS --lr $DENSE_LR --min-lr $DENSE_MIN_LR --lr-warmup-iters $(( DENSE_ITERS / 20 )) \
    --load $DENSE_DIR --save $DENSE_DIR --save-interval 100 --keep-last 1 \
    --log-interval 25 --eval-interval $DENSE_ITERS --eval-iters 4 --tag dense "$@"
fi

# 3. SparseGPT prior -------------------------------------------------------------------------------
stage "3. SparseGPT $N:$M one-shot pruning (the prior)"
if [ -f "$PRIOR_DIR/latest_checkpointed_iteration.txt" ]; then
  echo "kept $PRIOR_DIR"
else
  torchrun $DISTRIBUTED_ARGS tools/prune_oneshot.py --load $DENSE_DIR --method sparsegpt --N $N --M $M \
    --update-weight --calib-data $DATA_PREFIX --hessian-samples $HESSIAN_SAMPLES --seq-length $SEQ_LENGTH \
    --tensor-model-parallel-size $TP --save $PRIOR_DIR
fi

# 4. MaskLLM ---------------------------------------------------------------------------------------
stage "4. learn $N:$M masks of the frozen dense weights, TP=$TP ($MASK_ITERS iterations, prior strength $PRIOR_STRENGTH)"
if finished "$MASK_DIR" "$MASK_ITERS"; then
  echo "kept $MASK_DIR"
else
  if [ -f "$MASK_DIR/latest_checkpointed_iteration.txt" ]; then
    MASK_LOAD="--load $MASK_DIR"             # resume the interrupted mask learning
  else
    MASK_LOAD="--load $DENSE_DIR --finetune" # the dense weights; iteration and optimizer start fresh
  fi
  torchrun $DISTRIBUTED_ARGS pretrain_maskllm.py $COMMON_ARGS $MASK_LOAD \
    --train-iters $MASK_ITERS --lr $MASK_LR --min-lr $MASK_MIN_LR --lr-warmup-iters 0 \
    --save $MASK_DIR --save-interval 50 --keep-last 1 \
    --log-interval 25 --eval-interval $MASK_ITERS --eval-iters 4 --tag maskllm \
    --mask-only --N $N --M $M --gumbel-temperature-range $GUMBEL_TEMPERATURE --gumbel-scale-range $GUMBEL_SCALE \
    --prior-mask $PRIOR_DIR --prior-strength $PRIOR_STRENGTH --weight-reg $WEIGHT_REG "$@"
fi

# 5. perplexity ------------------------------------------------------------------------------------
stage "5. perplexity on the held-out play ($HELDOUT_TEXT)"
ppl() {  # ppl NAME CKPT [--sparse]: run eval_ppl, keep its log, print the perplexity
  local name=$1 ckpt=$2; shift 2
  torchrun $DISTRIBUTED_ARGS tools/eval_ppl.py --load "$ckpt" --text-file "$HELDOUT_TEXT" \
    --seq-length $SEQ_LENGTH --tensor-model-parallel-size $TP "$@" > "$OUT/logs/ppl_$name.log" 2>&1 \
    || { cat "$OUT/logs/ppl_$name.log" >&2; die "perplexity of $ckpt failed (log: $OUT/logs/ppl_$name.log)"; }
  awk '$1 == "PPL" {v = $2} END {if (v == "") exit 1; print v}' "$OUT/logs/ppl_$name.log" \
    || die "no 'PPL <value>' line in $OUT/logs/ppl_$name.log"
}
PPL_DENSE=$(ppl dense "$DENSE_DIR")
PPL_PRIOR=$(ppl prior "$PRIOR_DIR" --sparse)
PPL_LEARNED=$(ppl learned "$MASK_DIR" --sparse)

# 6. export ----------------------------------------------------------------------------------------
stage "6. Hugging Face export with the learned masks"
OVERWRITE=1 bash scripts/tools/export_hf.sh "$MASK_DIR" "$HF_DIR" fp32

# results ------------------------------------------------------------------------------------------
"$PYTHON" - "$OUT/results.json" "$PPL_DENSE" "$PPL_PRIOR" "$PPL_LEARNED" "$HF_DIR" "$MASK_DIR" "$PRIOR_DIR" \
  "$DENSE_DIR" "$SECONDS" <<'PY'
import json, os, sys

path, dense, prior, learned, hf, mask, prior_dir, dense_dir, seconds = sys.argv[1:]
results = {"dense": float(dense), "prior": float(prior), "learned": float(learned),
           "learned_beats_prior": float(learned) < float(prior),
           "export": hf, "checkpoints": {"dense": dense_dir, "prior": prior_dir, "learned": mask},
           "seconds": int(seconds)}
tmp = f"{path}.tmp"
with open(tmp, "w", encoding="utf-8") as f:
    json.dump(results, f, indent=2)
    f.write("\n")
os.replace(tmp, path)
PY

stage "done"
cat <<EOF
| held-out perplexity (The Tempest) | PPL |
|---|---|
| dense | $PPL_DENSE |
| SparseGPT 2:4 (prior) | $PPL_PRIOR |
| MaskLLM 2:4 (learned) | $PPL_LEARNED |

results: $OUT/results.json   export: $HF_DIR
EOF
if ! awk -v l="$PPL_LEARNED" -v p="$PPL_PRIOR" 'BEGIN { exit !(l < p) }'; then
  die "the learned masks (PPL $PPL_LEARNED) did not beat the SparseGPT prior (PPL $PPL_PRIOR)"
fi
