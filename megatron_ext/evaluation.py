"""Perplexity of a checkpoint on a text file or a tokenized dataset (``tools/eval_ppl.py``).

The math is ``megatron_ext.models.perplexity``'s; this module reads the checkpoint
(ours at any TP, or a Hugging Face directory), builds the dense model, and for
``--sparse`` applies the masks through a function the caller passes (the sparsity
layer's ``bake_masks``).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import torch

from megatron_ext import platform
from megatron_ext.checkpoint import (CONFIG_NAME, has_masks, load_for_rank, load_into_model, parse_dtype,
                                     read_checkpoint_info, strip_masks)
from megatron_ext.checkpoint.io import build_tokenizer_for
from megatron_ext.models.perplexity import (PerplexityError, PerplexityResult, dataset_tokens, evaluate_windows,
                                            make_windows, text_tokens)

__all__ = ["PerplexityError", "PerplexityResult", "evaluate"]


def evaluate(load: str | os.PathLike, *, seq_length: int, text_file: str | os.PathLike | None = None,
             data_path: str | os.PathLike | None = None, micro_batch_size: int = 1, sparse: bool = False,
             params_dtype: str | torch.dtype = "fp32", tokenizer_type: str | None = None,
             max_windows: int | None = None,
             apply_masks: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]] | None = None,
             ) -> PerplexityResult:
    """Perplexity of the checkpoint ``load`` on a text file or a tokenized dataset.

    Needs megatron's parallel state (``platform.init_distributed(tp)``); the TP size is
    the current one. Every rank returns the same result. A dense run ignores any mask
    tensors; ``sparse=True`` needs a checkpoint with masks and ``apply_masks``, which
    maps this rank's state dict to dense weights with the hard masks applied (the
    sparsity layer's, passed in by the caller: this layer does not import it).
    """
    from megatron_ext.models.build import build_model

    if (text_file is None) == (data_path is None):
        raise PerplexityError("give exactly one of --text-file and --data-path")
    # Cheap checks before any weight is read.
    if text_file is not None and not Path(text_file).is_file():
        raise PerplexityError(f"{text_file}: text file not found")
    path = Path(load)
    if not path.exists():
        raise PerplexityError(f"{path}: checkpoint not found")
    if not (path / CONFIG_NAME).is_file():
        read_checkpoint_info(path)  # validates the layout, names what is wrong
    loaded = load_for_rank(path, platform.tp_size(), platform.tp_rank(), tokenizer_type)
    if seq_length > loaded.config.max_position_embeddings:
        raise PerplexityError(f"--seq-length {seq_length} exceeds the model's max position embeddings "
                              f"{loaded.config.max_position_embeddings} ({path})")
    if sparse:
        if not has_masks(loaded.state_dict):
            raise PerplexityError(f"{path}: checkpoint has no masks "
                                  "(--sparse needs a checkpoint saved with sparsity masks)")
        if apply_masks is None:
            raise PerplexityError("sparse evaluation needs a function applying the hard masks")
        state_dict = strip_masks(apply_masks(loaded.state_dict))
    else:
        state_dict = strip_masks(loaded.state_dict)
    if text_file is not None:
        tokens = text_tokens(text_file, build_tokenizer_for(loaded, str(path)))
    else:
        from megatron_ext.data.indexed_dataset import check_token_range, verify_dataset

        try:
            verify_dataset(data_path)
            check_token_range(data_path, loaded.config.vocab_size)
        except ValueError as e:
            raise PerplexityError(f"--data-path: {e}") from None
        tokens = dataset_tokens(data_path)
    windows = make_windows(tokens, seq_length)
    if max_windows is not None:
        windows = windows[:max_windows]
    cfg = loaded.config
    # every parameter is overwritten by the checkpoint: skip the random initialisation
    model = build_model(cfg, parse_dtype(params_dtype), config_overrides={"perform_initialization": False})
    load_into_model(model, state_dict)
    del loaded, state_dict
    return evaluate_windows(model, windows, cfg.vocab_size, micro_batch_size, platform.device())
