#!/usr/bin/env bash
# Tokenize 20 C4 shards (en, train 00000-00019) with the LLaMA-2 tokenizer into
# C4_HOME/c4_<shard>_text_document.bin/.idx, the blend of
# scripts/learnable_sparsity/llama2_7b_mask_only_tp4_c4.sh.
#
#   bash scripts/data/prepare_c4_llama2.sh
#
# Input: the shards as downloaded from the allenai/c4 dataset, JSON lines with a "text"
# field: C4_RAW/c4-train.<shard>-of-01024.json or .json.gz. Every shard is checked before
# the first is tokenized; a shard whose .bin/.idx already exist is skipped (OVERWRITE=1
# redoes it). Paths are relative to the repository root; the variables can be set from
# the environment.
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/../lib.sh"

C4_RAW=${C4_RAW:-assets/data/c4/en}
C4_HOME=${C4_HOME:-assets/data/c4_llama2_pretokenized}
TOKENIZER_MODEL=${TOKENIZER_MODEL:-assets/checkpoints/llama2_7b_hf/tokenizer.model}
TOKENIZER_TYPE=${TOKENIZER_TYPE:-Llama2Tokenizer}          # scripts/data/prepare_*_llama3.sh: HuggingFaceTokenizer
FIRST_SHARD=${FIRST_SHARD:-0}
NUM_SHARDS=${NUM_SHARDS:-20}
WORKERS=${WORKERS:-8}
OVERWRITE=${OVERWRITE:-0}

cd "$ROOT"
[[ "$FIRST_SHARD" =~ ^[0-9]+$ ]] || die "FIRST_SHARD must be a shard number, got '$FIRST_SHARD'"
[[ "$NUM_SHARDS" =~ ^[1-9][0-9]*$ ]] || die "NUM_SHARDS must be a positive integer, got '$NUM_SHARDS'"
require_tokenizer "$TOKENIZER_MODEL" TOKENIZER_MODEL
INPUTS=()
for i in $(seq -f "%05g" "$FIRST_SHARD" $(( FIRST_SHARD + NUM_SHARDS - 1 ))); do
  base=$C4_RAW/c4-train.$i-of-01024.json
  if [ -f "$base" ]; then INPUTS+=("$base"); elif [ -f "$base.gz" ]; then INPUTS+=("$base.gz")
  else _check_failed "C4_RAW: shard $i not found: $base or $base.gz (set C4_RAW=...)"; fi
done
end_checks
mkdir -p "$C4_HOME"

PREFIXES=()
for input in "${INPUTS[@]}"; do
  name=$(basename "$input")
  shard=${name#c4-train.}; shard=${shard%%-of-*}
  prefix=$C4_HOME/c4_$shard
  PREFIXES+=("${prefix}_text_document")
  if [ "$OVERWRITE" != 1 ] && [ -f "${prefix}_text_document.bin" ] && [ -f "${prefix}_text_document.idx" ]; then
    echo "skip $input: ${prefix}_text_document exists"
    continue
  fi
  echo "tokenize $input -> ${prefix}_text_document"
  run_tool tools/preprocess_data.py \
    --input "$input" \
    --json-keys text \
    --output-prefix "$prefix" \
    --tokenizer-type "$TOKENIZER_TYPE" \
    --tokenizer-model "$TOKENIZER_MODEL" \
    --append-eod \
    --workers "$WORKERS"
done
run_tool tools/check_dataset.py "${PREFIXES[@]}"
