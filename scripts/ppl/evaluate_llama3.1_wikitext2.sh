#!/usr/bin/env bash
# WikiText-2 perplexity of a LLaMA-3.1 checkpoint (e.g. llama3.1-8b), dense or with its hard
# N:M masks.
#
#   scripts/ppl/evaluate_llama3.1_wikitext2.sh <ckpt> <model> <TP> <dense|sparse>
#
# The same evaluation as scripts/ppl/evaluate_llama2_wikitext2.sh (see there for the
# arguments and variables): the text is tokenized with the tokenizer that comes with the
# checkpoint, here LLaMA-3.1's tokenizer.json (HuggingFaceTokenizer, <|begin_of_text|> first),
# and the model's "llama3" rotary scaling comes with its configuration, both as they travel
# with a Hugging Face directory and with the checkpoints converted from it. LLaMA-3.1-8B has
# 8 query groups: TP is 1, 2, 4 or 8.
set -euo pipefail
exec bash "$(dirname "${BASH_SOURCE[0]}")/evaluate_llama2_wikitext2.sh" "$@"
