#!/usr/bin/env bash
# Tokenize WikiText-103 with the LLaMA-2 tokenizer, one document per article (the C4
# layout: JSON lines with "text"), into WIKI_HOME/wiki_<split>_llama2_text_document.bin/.idx,
# the data of scripts/incremental/llama2_7b_mask_only_wikitext103_tp4.sh.
#
#   bash scripts/data/prepare_wikitext103_llama2.sh
#
# Input: the raw release (wikitext-103-raw-v1): WIKI_RAW/wiki.<split>.raw for each split in
# SPLITS. An article starts at its title line " = Title = " (sections are " = = ... = = ").
# Every input is checked before the first is converted. Paths are relative to the
# repository root; the variables can be set from the environment.
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/../lib.sh"

WIKI_RAW=${WIKI_RAW:-assets/data/wikitext-103-raw}
WIKI_HOME=${WIKI_HOME:-assets/data/wikitext103_llama2_pretokenized}
TOKENIZER_MODEL=${TOKENIZER_MODEL:-assets/checkpoints/llama2_7b_hf/tokenizer.model}
TOKENIZER_TYPE=${TOKENIZER_TYPE:-Llama2Tokenizer}          # scripts/data/prepare_*_llama3.sh: HuggingFaceTokenizer
TOKENIZER_NAME=${TOKENIZER_NAME:-llama2}                    # in the output names: wiki_<split>_<name>_text_document
SPLITS=${SPLITS:-train}
WORKERS=${WORKERS:-8}

cd "$ROOT"
require_tokenizer "$TOKENIZER_MODEL" TOKENIZER_MODEL
for split in $SPLITS; do
  case "$split" in train|valid|test) ;; *) die "SPLITS: unknown split '$split' (train, valid, test)" ;; esac
  require_file "$WIKI_RAW/wiki.$split.raw" WIKI_RAW
done
end_checks
mkdir -p "$WIKI_HOME"

PREFIXES=()
for split in $SPLITS; do
  raw=$WIKI_RAW/wiki.$split.raw
  jsonl=$WIKI_HOME/wiki_$split.jsonl
  echo "split $raw into articles -> $jsonl"
  run_tool - "$raw" "$jsonl" <<'PY'
import json, os, re, sys

src, dst = sys.argv[1], sys.argv[2]
title = re.compile(r"^ = [^=].* = $")
tmp = f"{dst}.tmp.{os.getpid()}"
articles = 0
try:
    with open(src, encoding="utf-8") as f, open(tmp, "w", encoding="utf-8") as out:
        lines = []

        def flush():
            global articles
            text = "".join(lines).strip()
            if text:
                out.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")
                articles += 1
            lines.clear()

        for line in f:
            if title.match(line.rstrip("\n")):
                flush()
            lines.append(line)
        flush()
    os.replace(tmp, dst)
finally:
    if os.path.exists(tmp):
        os.remove(tmp)
print(f"{articles} articles")
PY
  prefix=$WIKI_HOME/wiki_${split}_${TOKENIZER_NAME}
  PREFIXES+=("${prefix}_text_document")
  run_tool tools/preprocess_data.py \
    --input "$jsonl" \
    --json-keys text \
    --output-prefix "$prefix" \
    --tokenizer-type "$TOKENIZER_TYPE" \
    --tokenizer-model "$TOKENIZER_MODEL" \
    --append-eod \
    --workers "$WORKERS"
done
run_tool tools/check_dataset.py "${PREFIXES[@]}"
