"""Inference of exported 2:4 models with sparse tensor-core kernels, in plain torch.

* ``sparse``: ``SparseLinear`` (cuSPARSELt's 2:4 GEMM, the Triton decode kernel or dense,
  per shape and token count, from a measured ``KernelTable``), the 2:4 and cuSPARSELt
  layouts in plain torch, the CPU fallback. With ``sparse_gemv`` (the Triton kernel that
  reads cuSPARSELt's compressed buffer at a few token rows, imported when first used), the
  only modules here that know about the device.
* ``model``: ``LlamaForInference``, a lean LLaMA over a static KV cache.
* ``generate``: ``greedy_generate`` with the decode step replayed from a CUDA graph.
* ``load``: ``load_sparse_model(hf_dir)`` for ``tools/export_sparse.py --format hf`` output.

Layers: imports ``megatron_ext.checkpoint`` (reading the directory) and the model config;
no transformers, and no megatron-core except its LLaMA-3.1 rotary scaling, imported for a
model that has one; so it runs wherever torch does.
"""
from megatron_ext.inference.generate import DecodeGraph, Generation, greedy_generate
from megatron_ext.inference.load import default_device, kernel_table_for, load_sparse_model, model_from_state_dict
from megatron_ext.inference.model import DenseLinear, KVCache, LlamaForInference, projection_shapes
from megatron_ext.inference.sparse import (KernelTable, SparseFormatError, SparseLinear, check_2of4, pack_2of4,
                                           sparse_kernels_available, sparse_kernels_note, unpack_2of4)

__all__ = [
    "DecodeGraph", "DenseLinear", "Generation", "KVCache", "KernelTable", "LlamaForInference", "SparseFormatError",
    "SparseLinear", "check_2of4", "default_device", "greedy_generate", "kernel_table_for", "load_sparse_model",
    "model_from_state_dict", "pack_2of4", "projection_shapes", "sparse_kernels_available", "sparse_kernels_note",
    "unpack_2of4",
]
