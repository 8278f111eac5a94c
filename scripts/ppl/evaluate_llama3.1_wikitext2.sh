#!/usr/bin/env bash
# WikiText-2 perplexity of a LLaMA-3.1 checkpoint (e.g. llama3.1-8b), dense or with its hard
# N:M masks.
#
#   scripts/ppl/evaluate_llama3.1_wikitext2.sh <ckpt> <model> <TP> <dense|sparse>
#
# The evaluation of scripts/ppl/evaluate_llama3_wikitext2.sh (see there for the tokenizer,
# and scripts/ppl/evaluate_llama2_wikitext2.sh for the arguments and variables); the model's
# "llama3" rotary scaling comes with its configuration, as it travels with a Hugging Face
# directory and with the checkpoints converted from it. LLaMA-3.1-8B has 8 query groups: TP
# is 1, 2, 4 or 8.
set -euo pipefail
exec bash "$(dirname "${BASH_SOURCE[0]}")/evaluate_llama3_wikitext2.sh" "$@"
