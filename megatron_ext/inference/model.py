"""A lean LLaMA for inference in plain torch (no transformers; megatron-core only for LLaMA-3.1's RoPE).

Built from a Hugging Face LLaMA state dict (``q/k/v_proj`` fused into one ``qkv``,
``gate/up_proj`` into one ``gate_up``: row concatenation keeps 2:4 groups along the input
intact and makes fewer, larger GEMMs), every projection a ``SparseLinear`` (2:4 kernels
where measured faster) or a plain dense weight. RMSNorm through ``F.rms_norm``, rotary
embeddings in Hugging Face's half-split layout (LLaMA-3.1's scaling by megatron-core's own
formula), attention through ``scaled_dot_product_attention``, a static KV cache so a decode
step can be captured in a CUDA graph (``DecodeGraph``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping, Optional

import torch
import torch.nn.functional as F

from megatron_ext.inference.sparse import KernelTable, SparseLinear
from megatron_ext.models.config import LlamaConfig

PROJECTIONS = ("qkv", "o", "gate_up", "down")


def projection_shapes(cfg: LlamaConfig) -> dict[str, tuple[int, int]]:
    """Weight ``[out, in]`` of each fused projection."""
    h, d = cfg.hidden_size, cfg.head_dim
    return {"qkv": ((cfg.num_attention_heads + 2 * cfg.num_query_groups) * d, h),
            "o": (h, cfg.num_attention_heads * d),
            "gate_up": (2 * cfg.ffn_hidden_size, h),
            "down": (h, cfg.ffn_hidden_size)}


class DenseLinear(torch.nn.Module):
    """``y = x W^T`` with the dense weight (the reference the sparse model is compared with)."""

    def __init__(self, weight: torch.Tensor, name: str = "weight"):
        super().__init__()
        self.weight, self.name = weight, name
        self.out_features, self.in_features = weight.shape

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)

    def weight_bytes(self) -> int:
        return self.weight.numel() * self.weight.element_size()


@dataclass
class KVCache:
    """Keys and values of every layer, ``[layers, batch, kv_heads, max_len, head_dim]`` each."""
    k: torch.Tensor
    v: torch.Tensor

    @classmethod
    def empty(cls, cfg: LlamaConfig, batch: int, max_len: int, dtype: torch.dtype, device) -> "KVCache":
        shape = (cfg.num_layers, batch, cfg.num_query_groups, max_len, cfg.head_dim)
        return cls(torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))

    @property
    def max_len(self) -> int:
        return self.k.shape[3]


def rotary_inv_freq(cfg: LlamaConfig, device=None) -> torch.Tensor:
    """The ``head_dim / 2`` rotary frequencies in fp64, with LLaMA-3.1's scaling when the
    config has one: megatron-core's own formula (imported only then), so this model turns
    queries and keys exactly as the trained ``GPTModel`` did."""
    d = cfg.head_dim
    inv = 1.0 / (cfg.rotary_base ** (torch.arange(0, d, 2, dtype=torch.float64, device=device) / d))
    if cfg.rope_scaling_factor is None:
        return inv
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding

    # a function in all but name: it reads nothing of the module, hence no instance
    return RotaryEmbedding._apply_scaling(None, inv, factor=cfg.rope_scaling_factor)


def rotary_tables(cfg: LlamaConfig, max_len: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin ``[max_len, head_dim]`` in fp32, Hugging Face's half-split layout."""
    inv = rotary_inv_freq(cfg, device)
    freqs = torch.outer(torch.arange(max_len, dtype=torch.float64, device=device), inv)
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos().float(), emb.sin().float()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``x [b, heads, t, d]`` rotated by ``cos/sin [t, d]`` (computed in fp32)."""
    xf = x.float()
    half = xf.shape[-1] // 2
    rotated = torch.cat([-xf[..., half:], xf[..., :half]], dim=-1)
    return (xf * cos + rotated * sin).to(x.dtype)


class Layer(torch.nn.Module):
    def __init__(self, cfg: LlamaConfig, linears: Mapping[str, torch.nn.Module], input_norm: torch.Tensor,
                 post_norm: torch.Tensor):
        super().__init__()
        self.cfg = cfg
        self.qkv, self.o, self.gate_up, self.down = (linears[p] for p in PROJECTIONS)
        self.input_norm, self.post_norm = input_norm, post_norm

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache_k: torch.Tensor,
                cache_v: torch.Tensor, positions: torch.Tensor, prefill: bool) -> torch.Tensor:
        cfg = self.cfg
        b, t, h = x.shape
        d, nq, nkv = cfg.head_dim, cfg.num_attention_heads, cfg.num_query_groups
        y = F.rms_norm(x, (h,), self.input_norm, cfg.norm_epsilon)
        q, k, v = self.qkv(y).split([nq * d, nkv * d, nkv * d], dim=-1)
        q = apply_rotary(q.view(b, t, nq, d).transpose(1, 2), cos, sin)
        k = apply_rotary(k.view(b, t, nkv, d).transpose(1, 2), cos, sin)
        v = v.view(b, t, nkv, d).transpose(1, 2)
        cache_k.index_copy_(2, positions, k)
        cache_v.index_copy_(2, positions, v)
        gqa = nq != nkv
        if prefill:  # the cache holds nothing before these tokens
            a = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        else:        # attend to the cache up to each query's position
            mask = torch.arange(cache_k.shape[2], device=x.device)[None, :] <= positions[:, None]
            a = F.scaled_dot_product_attention(q, cache_k, cache_v, attn_mask=mask, enable_gqa=gqa)
        x = x + self.o(a.transpose(1, 2).reshape(b, t, nq * d))
        y = F.rms_norm(x, (h,), self.post_norm, cfg.norm_epsilon)
        gate, up = self.gate_up(y).chunk(2, dim=-1)
        return x + self.down(F.silu(gate) * up)


class LlamaForInference(torch.nn.Module):
    """LLaMA forward for prefill and decode over a ``KVCache``; see the module doc."""

    def __init__(self, cfg: LlamaConfig, embed: torch.Tensor, layers: list[Layer], norm: torch.Tensor,
                 lm_head: torch.Tensor, max_len: int):
        super().__init__()
        self.cfg, self.embed, self.norm, self.lm_head = cfg, embed, norm, lm_head
        self.layers = torch.nn.ModuleList(layers)
        self.cos, self.sin = rotary_tables(cfg, max_len, embed.device)
        self.notes: list[str] = []

    @property
    def device(self) -> torch.device:
        return self.embed.device

    @property
    def dtype(self) -> torch.dtype:
        return self.embed.dtype

    def new_cache(self, batch: int, max_len: int) -> KVCache:
        if max_len > self.cos.shape[0]:
            self.cos, self.sin = rotary_tables(self.cfg, max_len, self.device)
        return KVCache.empty(self.cfg, batch, max_len, self.dtype, self.device)

    def forward(self, ids: torch.Tensor, cache: KVCache, positions: torch.Tensor, prefill: bool = False,
                last_only: bool = False) -> torch.Tensor:
        """Logits ``[b, t, vocab]`` (``[b, 1, vocab]`` with ``last_only``) of tokens ``ids [b, t]``
        at ``positions [t]`` (a device tensor, so one decode graph serves every position)."""
        x = F.embedding(ids, self.embed)
        cos, sin = self.cos[positions], self.sin[positions]
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, cache.k[i], cache.v[i], positions, prefill)
        if last_only:
            x = x[:, -1:]
        x = F.rms_norm(x, (self.cfg.hidden_size,), self.norm, self.cfg.norm_epsilon)
        return F.linear(x, self.lm_head)

    def linears(self) -> list[torch.nn.Module]:
        return [getattr(l, p) for l in self.layers for p in PROJECTIONS]

    def projection_bytes(self) -> int:
        """Bytes the projections' weights take on the device."""
        return sum(m.weight_bytes() for m in self.linears())

    def weight_bytes(self) -> int:
        """Bytes of every weight on the device."""
        other = [self.embed, self.norm] + [t for l in self.layers for t in (l.input_norm, l.post_norm)]
        if self.lm_head.data_ptr() != self.embed.data_ptr():
            other.append(self.lm_head)
        return self.projection_bytes() + sum(t.numel() * t.element_size() for t in other)


def fuse_hf_projections(sd: Mapping[str, torch.Tensor], i: int) -> dict[str, torch.Tensor]:
    """The four fused projection weights of layer ``i`` from a Hugging Face state dict."""
    p = f"model.layers.{i}."
    return {"qkv": torch.cat([sd[p + f"self_attn.{n}_proj.weight"] for n in "qkv"], dim=0),
            "o": sd[p + "self_attn.o_proj.weight"],
            "gate_up": torch.cat([sd[p + "mlp.gate_proj.weight"], sd[p + "mlp.up_proj.weight"]], dim=0),
            "down": sd[p + "mlp.down_proj.weight"]}


@torch.no_grad()
def build_from_hf_state_dict(cfg: LlamaConfig, sd: Mapping[str, torch.Tensor], *, sparse: bool,
                             table: Optional[KernelTable] = None, dtype: torch.dtype = torch.bfloat16,
                             device=None, keep_dense: bool = True, max_len: Optional[int] = None,
                             on_layer: Optional[Callable[[int], None]] = None) -> LlamaForInference:
    """``LlamaForInference`` from a Hugging Face LLaMA state dict (tensors on any device).

    ``sparse``: projections are ``SparseLinear`` (checked 2:4, kernels picked by ``table``),
    else ``DenseLinear``. Tensors move to ``device`` one layer at a time.
    """
    device = torch.device(device or "cpu")
    move = lambda t: t.to(device=device, dtype=dtype).contiguous()  # noqa: E731
    layers = []
    for i in range(cfg.num_layers):
        fused = fuse_hf_projections(sd, i)
        linears = {}
        for p in PROJECTIONS:
            name = f"model.layers.{i}.{p}"
            w = move(fused[p])
            linears[p] = (SparseLinear(w, table, name=name, keep_dense=keep_dense) if sparse
                          else DenseLinear(w, name))
        p = f"model.layers.{i}."
        layers.append(Layer(cfg, linears, move(sd[p + "input_layernorm.weight"]),
                            move(sd[p + "post_attention_layernorm.weight"])))
        del fused, linears
        if on_layer:
            on_layer(i)
    embed = move(sd["model.embed_tokens.weight"])
    lm_head = embed if cfg.tie_word_embeddings or "lm_head.weight" not in sd else move(sd["lm_head.weight"])
    return LlamaForInference(cfg, embed, layers, move(sd["model.norm.weight"]), lm_head,
                             max_len or cfg.max_position_embeddings)
