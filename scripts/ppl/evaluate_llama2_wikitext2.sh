#!/usr/bin/env bash
# WikiText-2 perplexity of a LLaMA checkpoint, dense or with its hard N:M masks.
#
#   scripts/ppl/evaluate_llama2_wikitext2.sh <ckpt> <model> <TP> <dense|sparse>
#
# <ckpt>: our checkpoint directory (any saved TP; resharded on load) or a Hugging Face
# directory; the tokenizer comes with it. <model>: a label (llama2-7b, llama2-13b,
# llama3-8b, ...) printed with the result. One process per TP rank (NPROC=TP unless
# set; more processes add data parallelism). Settings below can be overridden from
# the environment, e.g. WIKITEXT2_TEST=/data/wiki.test.raw SEQ_LENGTH=2048.
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/../lib.sh"

WIKITEXT2_TEST="${WIKITEXT2_TEST:-$ROOT/assets/data/wikitext-2-raw-v1/wiki.test.raw}"
SEQ_LENGTH="${SEQ_LENGTH:-4096}"
MICRO_BATCH_SIZE="${MICRO_BATCH_SIZE:-1}"
DTYPE="${DTYPE:-bf16}"

usage="usage: $0 <ckpt> <model> <TP> <dense|sparse>"
if [[ $# -ne 4 ]]; then
    echo "$usage" >&2
    exit 2
fi
CKPT="$1"
MODEL="$2"
TP="$3"
MODE="$4"
NPROC="${NPROC:-$TP}"

if [[ ! "$TP" =~ ^[1-9][0-9]*$ ]]; then
    echo "error: TP must be a positive integer, got '$TP'" >&2
    exit 2
fi
case "$MODE" in
    dense) SPARSE_FLAG="" ;;
    sparse) SPARSE_FLAG="--sparse" ;;
    *) echo "error: mode must be 'dense' or 'sparse', got '$MODE'" >&2; exit 2 ;;
esac
if [[ ! -e "$CKPT" ]]; then
    echo "error: checkpoint not found: $CKPT" >&2
    exit 1
fi
if [[ ! -f "$WIKITEXT2_TEST" ]]; then
    echo "error: WikiText-2 test text not found: $WIKITEXT2_TEST (set WIKITEXT2_TEST)" >&2
    exit 1
fi

echo "WikiText-2 PPL: model=$MODEL mode=$MODE tp=$TP nproc=$NPROC seq_length=$SEQ_LENGTH dtype=$DTYPE ckpt=$CKPT"
torchrun --standalone --nproc_per_node "$NPROC" "$ROOT/tools/eval_ppl.py" --load "$CKPT" --text-file "$WIKITEXT2_TEST" \
  --seq-length "$SEQ_LENGTH" --tensor-model-parallel-size "$TP" --micro-batch-size "$MICRO_BATCH_SIZE" --dtype "$DTYPE" \
  $SPARSE_FLAG
