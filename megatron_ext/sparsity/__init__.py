"""Learnable N:M sparsity (MaskLLM) on our megatron-core LLaMA.

* ``nm``: candidate masks, N:M checks, group views.
* ``state``: ``SparsityState`` (N, M, tau, kappa, hard, mode, step) shared by a model's layers.
* ``gumbel``: counter-based Gumbel noise and Gumbel-softmax masks: the reference, and the
  two passes of ``W * mask`` (sample, backward) with one implementation per device.
* ``fused_mask``: the Triton kernels of those two passes (the GPU's implementation).
* ``layers``: ``MaskedColumnParallelLinear`` / ``MaskedRowParallelLinear``: one draw and one
  mask backward per training step.
* ``model``: ``build_sparse_model``, ``finish_mask_backward`` (once per step, after the
  last backward), mask-only setup, regulariser, metrics.
* ``masks``: hard masks from state dicts / checkpoints, prior injection.
"""
from megatron_ext.sparsity.gumbel import gumbel_soft_mask, masked_weight, masked_weight_sq_norm, noise_key
from megatron_ext.sparsity.layers import MaskedColumnParallelLinear, MaskedRowParallelLinear
from megatron_ext.sparsity.masks import apply_prior, extract_hard_masks, load_prior_masks, model_hard_masks
from megatron_ext.sparsity.model import (MaskMetrics, assign_layer_names, build_sparse_model, finish_mask_backward,
                                         freeze_for_mask_only, mask_param_groups, masked_linears, sparse_weight_norm,
                                         sparsity_state)
from megatron_ext.sparsity.nm import candidates, check_nm, group_view
from megatron_ext.sparsity.state import SparsityState, linear_schedule, weight_reg_coefficient

__all__ = [
    "MaskMetrics", "MaskedColumnParallelLinear", "MaskedRowParallelLinear", "SparsityState", "apply_prior",
    "assign_layer_names", "build_sparse_model", "candidates", "check_nm", "extract_hard_masks",
    "finish_mask_backward", "freeze_for_mask_only", "group_view", "gumbel_soft_mask", "linear_schedule",
    "load_prior_masks", "mask_param_groups", "masked_linears", "masked_weight", "masked_weight_sq_norm",
    "model_hard_masks", "noise_key", "sparse_weight_norm", "sparsity_state", "weight_reg_coefficient",
]
