#!/usr/bin/env bash
# Tokenize 20 C4 shards with the LLaMA-3.1 tokenizer (tokenizer.json of its Hugging Face
# directory: 128k BPE, <|begin_of_text|> first, <|end_of_text|> appended) into
# C4_HOME/c4_<shard>_text_document.bin/.idx, the blend of
# scripts/learnable_sparsity/llama3.1_8b_mask_only_tp8_c4.sh.
#
#   bash scripts/data/prepare_c4_llama3.1.sh
#
# The steps, inputs and variables are those of scripts/data/prepare_c4_llama3.sh; only the
# tokenizer's directory and the output directory differ. LLaMA-3.1 keeps LLaMA-3's vocabulary
# and BPE merges, so shards made by scripts/data/prepare_c4_llama3.sh serve as well (set C4_HOME).
set -euo pipefail
export C4_HOME=${C4_HOME:-assets/data/c4_llama3.1_pretokenized}
export TOKENIZER_MODEL=${TOKENIZER_MODEL:-assets/checkpoints/llama3.1_8b_hf}
exec bash "$(dirname "${BASH_SOURCE[0]}")/prepare_c4_llama3.sh" "$@"
