"""Learnable N:M sparsity (MaskLLM) on our megatron-core LLaMA.

* ``nm``: candidate masks, N:M checks, group views.
* ``state``: ``SparsityState`` (N, M, tau, kappa, hard, mode, step) shared by a model's layers.
* ``gumbel``: counter-based Gumbel noise and Gumbel-softmax masks (reference and
  memory-lean autograd functions that recompute the noise in the backward).
* ``layers``: ``MaskedColumnParallelLinear`` / ``MaskedRowParallelLinear``.
* ``model``: ``build_sparse_model``, mask-only setup, regulariser, metrics.
* ``masks``: hard masks from state dicts / checkpoints, prior injection.
"""
from megatron_ext.sparsity.gumbel import gumbel_soft_mask, masked_weight, masked_weight_sq_norm, noise_key
from megatron_ext.sparsity.layers import MaskedColumnParallelLinear, MaskedRowParallelLinear
from megatron_ext.sparsity.masks import apply_prior, extract_hard_masks, load_prior_masks, model_hard_masks
from megatron_ext.sparsity.model import (MaskMetrics, assign_layer_names, build_sparse_model, freeze_for_mask_only,
                                         mask_param_groups, masked_linears, sparse_weight_norm, sparsity_state)
from megatron_ext.sparsity.nm import candidates, check_nm, group_view
from megatron_ext.sparsity.state import SparsityState, linear_schedule, weight_reg_coefficient

__all__ = [
    "MaskMetrics", "MaskedColumnParallelLinear", "MaskedRowParallelLinear", "SparsityState", "apply_prior",
    "assign_layer_names", "build_sparse_model", "candidates", "check_nm", "extract_hard_masks",
    "freeze_for_mask_only", "group_view", "gumbel_soft_mask", "linear_schedule", "load_prior_masks",
    "mask_param_groups", "masked_linears", "masked_weight", "masked_weight_sq_norm", "model_hard_masks",
    "noise_key", "sparse_weight_norm", "sparsity_state", "weight_reg_coefficient",
]
