"""Core attention through ``torch.nn.functional.scaled_dot_product_attention``.

Fills the ``core_attention`` slot of megatron-core's ``SelfAttention``: it receives
query/key/value after the QKV projection and rotary embedding and returns the
context that ``linear_proj`` consumes. Unlike megatron-core's local
``DotProductAttention`` it never materialises the ``[b, heads, s, s]`` score matrix:
PyTorch picks a flash / memory-efficient kernel where one exists.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.utils import divide


class SDPAttention(MegatronModule):
    """Scaled dot-product attention over this rank's heads, with grouped-query attention.

    Shapes follow megatron-core: query ``[sq, b, np, hn]``, key/value ``[sk, b, ng, hn]``
    (``np``/``ng`` the heads / query groups of this tensor-parallel rank), output
    ``[sq, b, np * hn]``. Query head ``i`` attends with key/value group
    ``i // (np // ng)``, as in megatron-core's own attention.

    Masks: with ``AttnMaskType.causal`` the mask argument is ignored and causality is
    applied inside the kernel (aligned bottom-right when ``sq < sk``). With
    ``padding``/``arbitrary`` the given boolean mask (True = blocked) is applied.
    """

    def __init__(
        self,
        config: TransformerConfig,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str = "self",
        attention_dropout: Optional[float] = None,
        softmax_scale: Optional[float] = None,
        cp_comm_type: Optional[str] = None,
        pg_collection=None,
    ):
        super().__init__(config=config)
        if config.context_parallel_size != 1:
            raise ValueError("SDPAttention does not support context parallelism")
        if config.apply_query_key_layer_scaling:
            raise ValueError("SDPAttention does not support apply_query_key_layer_scaling")
        if getattr(config, "softmax_type", "vanilla") != "vanilla":
            raise ValueError(f"SDPAttention supports only softmax_type='vanilla', got {config.softmax_type!r}")
        if getattr(config, "window_size", None) is not None:
            raise ValueError("SDPAttention does not support sliding-window attention")
        if pg_collection is None:
            from megatron.core.process_groups_config import ProcessGroupCollection

            pg_collection = ProcessGroupCollection.use_mpu_process_groups(required_pgs=["tp"])
        tp = pg_collection.tp.size()
        self.layer_number = max(1, layer_number)
        self.attn_mask_type = attn_mask_type
        self.attention_type = attention_type
        self.num_heads = divide(config.num_attention_heads, tp)
        self.num_groups = divide(config.num_query_groups, tp)
        self.head_dim = config.kv_channels
        self.softmax_scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(self.head_dim)
        self.dropout_p = config.attention_dropout if attention_dropout is None else attention_dropout

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: Optional[torch.Tensor],
        attn_mask_type: Optional[AttnMaskType] = None,
        attention_bias: Optional[torch.Tensor] = None,
        packed_seq_params: Optional[PackedSeqParams] = None,
    ) -> torch.Tensor:
        if packed_seq_params is not None:
            raise NotImplementedError("SDPAttention does not support packed sequences")
        if attention_bias is not None:
            raise NotImplementedError("SDPAttention does not support an attention bias")
        mask_type = attn_mask_type if attn_mask_type is not None else self.attn_mask_type
        sq, b = query.shape[0], query.shape[1]
        sk = key.shape[0]

        # [s, b, heads, hn] -> [b, heads, s, hn]
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        is_causal, mask = False, None
        if mask_type in (AttnMaskType.causal, AttnMaskType.causal_bottom_right):
            if sq == sk:
                is_causal = True
            elif sq > 1:  # queries are the last sq positions of the sk keys
                mask = torch.ones(sq, sk, dtype=torch.bool, device=q.device).tril(diagonal=sk - sq)
        elif mask_type in (AttnMaskType.padding, AttnMaskType.arbitrary) and attention_mask is not None:
            mask = ~attention_mask.to(torch.bool)
        elif mask_type not in (AttnMaskType.no_mask, AttnMaskType.padding, AttnMaskType.arbitrary):
            raise NotImplementedError(f"SDPAttention does not support attn_mask_type {mask_type}")

        dropout_p = self.dropout_p if self.training else 0.0
        gqa = self.num_heads != self.num_groups
        kwargs = dict(attn_mask=mask, dropout_p=dropout_p, is_causal=is_causal, scale=self.softmax_scale,
                      enable_gqa=gqa)
        if dropout_p > 0.0 and not self.config.sequence_parallel:
            with tensor_parallel.get_cuda_rng_tracker().fork():
                out = F.scaled_dot_product_attention(q, k, v, **kwargs)
        else:
            out = F.scaled_dot_product_attention(q, k, v, **kwargs)
        # [b, np, sq, hn] -> [sq, b, np * hn]
        return out.permute(2, 0, 1, 3).reshape(sq, b, self.num_heads * self.head_dim)
