#!/usr/bin/env bash
# The data pipeline end to end on the shipped sample (what `make demo-data` runs; `make demo`
# runs the whole MaskLLM quickstart, examples/quickstart.sh), in seconds:
#
#   1. tokenize the shipped plays (examples/data/shakespeare_train.jsonl) as two datasets,
#      the comedies and the tragedies, with the shipped LLaMA-format tokenizer into Megatron
#      .bin/.idx files (tools/preprocess_data.py);
#   2. check both datasets (tools/check_dataset.py);
#   3. build the blended GPT datasets a training run would read ("0.3 comedies 0.7
#      tragedies", split 98,2,0), print the sample counts per split and per dataset, and
#      decode a few training samples.
#
#   bash examples/demo_data.sh            (outputs in output/demo; OUT=... to change)
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
if [ -z "${PYTHON:-}" ]; then
  if [ -x "$ROOT/.venv/bin/python" ]; then PYTHON=$ROOT/.venv/bin/python; else PYTHON=$(command -v python3); fi
fi
cd "$ROOT"

SAMPLE=examples/data
TOKENIZER_MODEL=$SAMPLE/tokenizer.model
OUT=${OUT:-output/demo}
SEQ_LENGTH=${SEQ_LENGTH:-256}
TRAIN_SAMPLES=${TRAIN_SAMPLES:-512}
VALID_SAMPLES=${VALID_SAMPLES:-32}
SHOW=${SHOW:-3}
mkdir -p "$OUT"

COMEDIES='"source": "(twelfth_night|midsummer_nights_dream)"'
grep -E "$COMEDIES" "$SAMPLE/shakespeare_train.jsonl" > "$OUT/comedies.jsonl"
grep -vE "$COMEDIES" "$SAMPLE/shakespeare_train.jsonl" > "$OUT/tragedies.jsonl"

echo "== 1. tokenize the sample: $(wc -l < "$OUT/comedies.jsonl") comedy and $(wc -l < "$OUT/tragedies.jsonl") tragedy documents"
for part in comedies tragedies; do
  "$PYTHON" tools/preprocess_data.py --input "$OUT/$part.jsonl" --output-prefix "$OUT/$part" \
    --tokenizer-type Llama2Tokenizer --tokenizer-model "$TOKENIZER_MODEL" --append-eod --workers 2 \
    --log-interval 100000
done

echo "== 2. check the datasets"
"$PYTHON" tools/check_dataset.py "$OUT/comedies_text_document" "$OUT/tragedies_text_document"

echo "== 3. blended GPT datasets"
"$PYTHON" - "$OUT" "$TOKENIZER_MODEL" "$SEQ_LENGTH" "$TRAIN_SAMPLES" "$VALID_SAMPLES" "$SHOW" <<'PY'
import sys

import numpy as np

from megatron_ext.data.blend import build_gpt_datasets
from megatron_ext.data.gpt_dataset import GPTDatasetConfig
from megatron_ext.data.tokenizers import build_tokenizer

out, tok_path, seq, n_train, n_valid, show = sys.argv[1], sys.argv[2], *map(int, sys.argv[3:])
tok = build_tokenizer("Llama2Tokenizer", tok_path)
config = GPTDatasetConfig(sequence_length=seq, eod_token_id=tok.eod, random_seed=1234,
                          data_cache_path=f"{out}/cache")
blend = f"0.3 {out}/comedies_text_document 0.7 {out}/tragedies_text_document"
train, valid, test = build_gpt_datasets(config, blend, "98,2,0", [n_train, n_valid, 0])
print(f"--data-path {blend} --split 98,2,0 --seq-length {seq}")
print("| split | samples | from comedies | from tragedies | index cache |")
print("|---|---|---|---|---|")
for name, ds in (("train", train), ("valid", valid)):
    counts = np.bincount(ds.dataset_index, minlength=2)
    print(f"| {name} | {len(ds)} | {counts[0]} | {counts[1]} | {'hit' if ds.cache_hit else 'built'} |")
print(f"test: {'none (split share 0)' if test is None else len(test)}")
for i in range(show):
    s = train[i]
    text = tok.detokenize(s["tokens"].tolist()).replace("\n", " / ")
    source = ("comedies", "tragedies")[s["dataset_id"]]
    print(f"\nsample {i} ({source}, {len(s['tokens'])} tokens, {int(s['loss_mask'].sum())} with loss):")
    print(f"  {text[:240]}{'...' if len(text) > 240 else ''}")
PY
echo
echo "demo done: datasets and index cache in $OUT"
