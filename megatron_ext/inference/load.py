"""Load an exported 2:4 Hugging Face directory (``tools/export_sparse.py --format hf``) for inference."""
from __future__ import annotations

import os
from typing import Callable, Optional, Sequence

import torch

from megatron_ext.checkpoint import load_hf_state_dict
from megatron_ext.checkpoint.hf import read_hf_config
from megatron_ext.inference.model import LlamaForInference, build_from_hf_state_dict, projection_shapes
from megatron_ext.inference.sparse import (DEFAULT_TOKEN_COUNTS, KernelTable, default_cache_path, measure_table,
                                           sparse_kernels_available, sparse_kernels_note)
from megatron_ext.models.config import LlamaConfig


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def kernel_table_for(cfg: LlamaConfig, *, dtype: torch.dtype = torch.bfloat16, device=None,
                     token_counts: Sequence[int] = DEFAULT_TOKEN_COUNTS,
                     cache: Optional[os.PathLike] = None, log: Optional[Callable[[str], None]] = None
                     ) -> Optional[KernelTable]:
    """The measured kernel table for ``cfg``'s projection shapes (None where the sparse kernels
    do not exist). ``cache`` defaults to ``default_cache_path()``."""
    device = torch.device(device or default_device())
    if not sparse_kernels_available(device):
        return None
    return measure_table(projection_shapes(cfg).values(), token_counts, dtype,
                         cache if cache is not None else default_cache_path(), device, log)


def model_from_state_dict(cfg: LlamaConfig, sd, *, sparse: bool = True, dtype: torch.dtype = torch.bfloat16,
                          device=None, token_counts: Sequence[int] = DEFAULT_TOKEN_COUNTS,
                          table: Optional[KernelTable] = None, table_cache: Optional[os.PathLike] = None,
                          keep_dense: bool = True, max_len: Optional[int] = None,
                          log: Optional[Callable[[str], None]] = None) -> LlamaForInference:
    """``LlamaForInference`` from a Hugging Face state dict; see ``load_sparse_model``."""
    device = torch.device(device or default_device())
    if sparse and table is None:
        table = kernel_table_for(cfg, dtype=dtype, device=device, token_counts=token_counts, cache=table_cache,
                                 log=log)
    model = build_from_hf_state_dict(cfg, sd, sparse=sparse, table=table, dtype=dtype, device=device,
                                     keep_dense=keep_dense, max_len=max_len)
    note = sparse_kernels_note(device) if sparse else None
    if note:
        model.notes.append(note)
        if log:
            log(f"note: {note}")
    return model


def load_sparse_model(path: str | os.PathLike, *, sparse: bool = True, dtype: torch.dtype = torch.bfloat16,
                      device=None, token_counts: Sequence[int] = DEFAULT_TOKEN_COUNTS,
                      table_cache: Optional[os.PathLike] = None, keep_dense: bool = True,
                      max_len: Optional[int] = None, log: Optional[Callable[[str], None]] = None
                      ) -> LlamaForInference:
    """An exported 2:4 Hugging Face LLaMA directory, ready for inference on ``device``.

    ``sparse=True``: every q/k/v/o/gate/up/down weight is checked to be 2:4 and runs through
    the kernel that ``kernel_table_for`` measured fastest for its shape and token count
    (cuSPARSELt's sparse GEMM, the Triton decode kernel at up to 16 token rows, or the dense
    GEMM); ``keep_dense=False`` keeps only the compressed weights (0.5625x of dense bf16),
    running the faster compressed kernel where dense was measured faster. Where the sparse kernels do not exist
    (a CPU) the dense masked weights run and ``model.notes`` says so. ``sparse=False``
    loads the same weights dense (the reference).
    """
    cfg = read_hf_config(path)
    sd = load_hf_state_dict(path)
    return model_from_state_dict(cfg, sd, sparse=sparse, dtype=dtype, device=device, token_counts=token_counts,
                                 table_cache=table_cache, keep_dense=keep_dense, max_len=max_len, log=log)
