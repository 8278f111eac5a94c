"""Our LLaMA layer spec: megatron-core modules assembled by ``ModuleSpec``.

A layer is megatron-core's ``TransformerLayer``: RMSNorm -> ``SelfAttention``
(fused QKV ``ColumnParallelLinear``, rotary embedding, our SDPA core attention,
``RowParallelLinear`` output) -> RMSNorm -> ``MLP`` (gate/up ``ColumnParallelLinear``,
SwiGLU, ``RowParallelLinear`` down). No biases; norms are ``torch.nn.RMSNorm``
through megatron-core's ``WrappedTorchNorm``, so nothing depends on
TransformerEngine or apex.

The four projections can be replaced through ``linear_overrides`` (e.g. by masked
Column/Row parallel linears) without touching anything else.
"""
from __future__ import annotations

from typing import Mapping, Optional, Union

from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.torch_norm import WrappedTorchNorm
from megatron.core.transformer.transformer_block import TransformerBlock, TransformerBlockSubmodules
from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules

from megatron_ext.models.attention import SDPAttention
from megatron_ext.models.config import LINEAR_NAMES, LINEAR_PATHS  # noqa: F401  (re-exported)

# each slot (qkv, proj, fc1, fc2) column-parallel (output split) or row-parallel (input split)
DEFAULT_LINEARS = dict(zip(LINEAR_NAMES, (ColumnParallelLinear, RowParallelLinear, ColumnParallelLinear,
                                          RowParallelLinear)))

Buildable = Union[ModuleSpec, type]


def llama_layer_spec(linear_overrides: Optional[Mapping[str, Buildable]] = None,
                     core_attention: Buildable = SDPAttention) -> ModuleSpec:
    """Spec of one LLaMA decoder layer.

    ``linear_overrides`` maps any of ``linear_qkv``, ``linear_proj``, ``linear_fc1``,
    ``linear_fc2`` to a module class (or ``ModuleSpec``) with the constructor of
    megatron-core's ``ColumnParallelLinear`` (qkv, fc1) / ``RowParallelLinear``
    (proj, fc2). ``core_attention`` defaults to our SDPA attention.
    """
    overrides = dict(linear_overrides or {})
    unknown = sorted(set(overrides) - set(LINEAR_NAMES))
    if unknown:
        raise ValueError(f"unknown linear override(s) {unknown}; expected some of {list(LINEAR_NAMES)}")
    linears = {**DEFAULT_LINEARS, **overrides}
    return ModuleSpec(
        module=TransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=WrappedTorchNorm,
            self_attention=ModuleSpec(
                module=SelfAttention,
                params={"attn_mask_type": AttnMaskType.causal},
                submodules=SelfAttentionSubmodules(
                    linear_qkv=linears["linear_qkv"],
                    core_attention=core_attention,
                    linear_proj=linears["linear_proj"],
                    q_layernorm=IdentityOp,
                    k_layernorm=IdentityOp,
                ),
            ),
            self_attn_bda=get_bias_dropout_add,
            pre_mlp_layernorm=WrappedTorchNorm,
            mlp=ModuleSpec(
                module=MLP,
                submodules=MLPSubmodules(linear_fc1=linears["linear_fc1"], linear_fc2=linears["linear_fc2"]),
            ),
            mlp_bda=get_bias_dropout_add,
        ),
    )


def block_spec(layer_spec: ModuleSpec, num_layers: int) -> ModuleSpec:
    """A decoder of ``num_layers`` copies of ``layer_spec`` with a torch RMSNorm at the end.

    Spelling the block out keeps the final norm independent of which optional
    extensions (TransformerEngine, apex) happen to be installed.
    """
    return ModuleSpec(
        module=TransformerBlock,
        submodules=TransformerBlockSubmodules(layer_specs=[layer_spec] * num_layers, layer_norm=WrappedTorchNorm),
    )


def megatron_local_layer_spec() -> ModuleSpec:
    """megatron-core's own local spec (``DotProductAttention``) with RMSNorm, for comparisons."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    return get_gpt_layer_local_spec(normalization="RMSNorm")
