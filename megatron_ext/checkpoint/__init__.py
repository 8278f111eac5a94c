"""Checkpoints: layout, tensor-parallel resharding, Hugging Face mapping, one writer, one reader.

* ``layout``: every file, directory and key name; ``CheckpointInfo`` (``checkpoint.json``),
  ``read_checkpoint_info``, ``find_checkpoint``; ``CheckpointError``.
* ``resharding``: how each tensor splits over TP ranks (a readable table), merge, split, reshard.
* ``hf``: Hugging Face ``config.json`` and weights <-> our config and rank state dicts.
* ``io``: the atomic writer (``begin_save`` / ``write_shard`` / ``commit_save``, and
  ``save_checkpoint`` for one process) and the reader (``read_shard``, ``load_checkpoint``,
  ``load_rank_state_dict``, ``load_for_rank``), shared by the tools and the trainer.
* ``train_state``: optimizer, schedule, random state and data position of a training run,
  saved collectively.
* ``gguf``: llama-architecture GGUF files (dequantized, rotary permutation undone, tokenizer rebuilt).
* ``convert``: conversions between HF, GGUF and our format (``tools/convert_checkpoint.py``).

Layers: imports ``megatron_ext.models`` (the config) and ``platform``; used by
``sparsity``, ``training`` and the tools. No module here needs a GPU or a process group,
except the collective ``save_training_checkpoint``.
"""
from megatron_ext.checkpoint.files import copy_tokenizer, owned, tokenizer_files
from megatron_ext.checkpoint.layout import (CHECKPOINT_VERSION, HARD_MASK_SUFFIX, INFO_FILE, LOGITS_SUFFIX, MASK_SUFFIXES, MODEL_FILE,
                                            TOKENIZER_DIR, TRACKER_FILE, CheckpointError, CheckpointInfo,
                                            find_checkpoint, has_masks, infer_tokenizer_type, iteration_dir_name,
                                            list_iterations, megatron_args, parse_dtype, read_checkpoint_info,
                                            strip_masks, dtype_name)
from megatron_ext.checkpoint.resharding import (merge_tp, rank_tensor_shapes, reshard, split_tp,
                                                validate_rank_state_dicts)
from megatron_ext.checkpoint.hf import (CONFIG_NAME, from_hf_config, hf_tensor_shapes, hf_to_mcore, load_hf_state_dict, mcore_to_hf, read_hf_checkpoint,
                                        save_hf_checkpoint, to_hf_config)
from megatron_ext.checkpoint.io import (LoadedModel, load_checkpoint, load_for_rank, load_into_model,
                                        load_rank_state_dict, model_state_dict, read_shard, save_checkpoint)
from megatron_ext.checkpoint.convert import convert_checkpoint

__all__ = [
    "CHECKPOINT_VERSION", "CONFIG_NAME", "copy_tokenizer", "dtype_name", "hf_tensor_shapes",
    "load_hf_state_dict", "megatron_args", "owned", "tokenizer_files",
    "HARD_MASK_SUFFIX", "INFO_FILE", "LOGITS_SUFFIX", "MASK_SUFFIXES", "MODEL_FILE", "TOKENIZER_DIR", "TRACKER_FILE",
    "CheckpointError", "CheckpointInfo", "LoadedModel", "convert_checkpoint", "find_checkpoint", "from_hf_config",
    "has_masks", "hf_to_mcore", "infer_tokenizer_type", "iteration_dir_name", "list_iterations", "load_checkpoint",
    "load_for_rank", "load_into_model", "load_rank_state_dict", "mcore_to_hf", "merge_tp", "model_state_dict",
    "parse_dtype", "rank_tensor_shapes", "read_checkpoint_info", "read_hf_checkpoint", "read_shard", "reshard",
    "save_checkpoint", "save_hf_checkpoint", "split_tp", "strip_masks", "to_hf_config", "validate_rank_state_dicts",
]
