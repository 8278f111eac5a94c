#!/usr/bin/env bash
# Tokenize WikiText-103 with the LLaMA-3 tokenizer (tokenizer.json of the Hugging Face
# directory), one document per article, into WIKI_HOME/wiki_<split>_llama3_text_document.bin/.idx,
# the data of scripts/incremental/llama3_8b_mask_only_wikitext103_tp8.sh.
#
#   bash scripts/data/prepare_wikitext103_llama3.sh
#
# The steps, inputs and variables are those of scripts/data/prepare_wikitext103_llama2.sh;
# only the tokenizer and the output names differ.
set -euo pipefail
export WIKI_HOME=${WIKI_HOME:-assets/data/wikitext103_llama3_pretokenized}
export TOKENIZER_MODEL=${TOKENIZER_MODEL:-assets/checkpoints/llama3_8b_hf}
export TOKENIZER_TYPE=HuggingFaceTokenizer
export TOKENIZER_NAME=${TOKENIZER_NAME:-llama3}
exec bash "$(dirname "${BASH_SOURCE[0]}")/prepare_wikitext103_llama2.sh" "$@"
