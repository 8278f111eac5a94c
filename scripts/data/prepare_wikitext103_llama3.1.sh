#!/usr/bin/env bash
# Tokenize WikiText-103 with the LLaMA-3.1 tokenizer (tokenizer.json of its Hugging Face
# directory), one document per article, into
# WIKI_HOME/wiki_<split>_llama3.1_text_document.bin/.idx, the data of
# scripts/incremental/llama3.1_8b_mask_only_wikitext103_tp8.sh.
#
#   bash scripts/data/prepare_wikitext103_llama3.1.sh
#
# The steps, inputs and variables are those of scripts/data/prepare_wikitext103_llama3.sh;
# only the tokenizer's directory and the output names differ.
set -euo pipefail
export WIKI_HOME=${WIKI_HOME:-assets/data/wikitext103_llama3.1_pretokenized}
export TOKENIZER_MODEL=${TOKENIZER_MODEL:-assets/checkpoints/llama3.1_8b_hf}
export TOKENIZER_NAME=llama3.1
exec bash "$(dirname "${BASH_SOURCE[0]}")/prepare_wikitext103_llama3.sh" "$@"
