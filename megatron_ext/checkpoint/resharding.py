"""Tensor-parallel layout of a checkpoint: which tensor splits how, and resharding.

The unit of exchange is one tensor-parallel rank's state dict of megatron-core's
``GPTModel`` built from our layer spec (names and shapes in ``rank_tensor_shapes``).
Every rule is looked up by the module that owns a tensor, so any tensor that module
owns (its weight, its mask logits, its hard mask) is split the same way. Pure
tensor operations: no GPU, no process group.
"""
from __future__ import annotations

import re
from typing import Mapping, Sequence

import torch

from megatron_ext.checkpoint.layout import CheckpointError, is_extra_state
from megatron_ext.models.config import LINEAR_PATHS, ConfigError, LlamaConfig

# --------------------------------------------------------------------------- partitioning
# How each module's tensors are split over TP ranks. Rules are looked up by the module
# path (the key without its last component) so any tensor a module owns (a weight, a
# sparsity mask of the same layout) is resharded the same way.
VOCAB, COLUMN, GATED, ROW, REPLICATED = "vocab", "column", "gated", "row", "replicated"


def _in_layer(path: str) -> re.Pattern:
    return re.compile(r"^decoder\.layers\.\d+\." + re.escape(path) + "$")


_RULES = (
    (re.compile(r"^embedding\.word_embeddings$"), VOCAB),
    (re.compile(r"^output_layer$"), VOCAB),
    (_in_layer(LINEAR_PATHS["linear_qkv"]), COLUMN),
    (_in_layer(LINEAR_PATHS["linear_proj"]), ROW),
    (_in_layer(LINEAR_PATHS["linear_fc1"]), GATED),
    (_in_layer(LINEAR_PATHS["linear_fc2"]), ROW),
    (re.compile(r"^decoder\.layers\.\d+\.(input_layernorm|pre_mlp_layernorm)$"), REPLICATED),
    (re.compile(r"^decoder\.final_layernorm$"), REPLICATED),
)


def _rule(key: str) -> str:
    module = key.rsplit(".", 1)[0]
    for pattern, rule in _RULES:
        if pattern.match(module):
            return rule
    raise CheckpointError(f"tensor {key!r}: no tensor-parallel layout known for module {module!r}")



def rank_tensor_shapes(cfg: LlamaConfig, tp: int) -> dict[str, tuple[int, ...]]:
    """Every tensor of one TP rank's state dict with its shape (the contract)."""
    cfg.validate_tp(tp)
    h, d = cfg.hidden_size, cfg.head_dim
    pv = cfg.padded_vocab_size(tp)
    qkv_rows = (cfg.num_attention_heads + 2 * cfg.num_query_groups) * d // tp
    shapes: dict[str, tuple[int, ...]] = {"embedding.word_embeddings.weight": (pv // tp, h)}
    for i in range(cfg.num_layers):
        p = f"decoder.layers.{i}."
        shapes.update({
            p + "input_layernorm.weight": (h,),
            p + "self_attention.linear_qkv.weight": (qkv_rows, h),
            p + "self_attention.linear_proj.weight": (h, cfg.num_attention_heads * d // tp),
            p + "pre_mlp_layernorm.weight": (h,),
            p + "mlp.linear_fc1.weight": (2 * cfg.ffn_hidden_size // tp, h),
            p + "mlp.linear_fc2.weight": (h, cfg.ffn_hidden_size // tp),
        })
    shapes["decoder.final_layernorm.weight"] = (h,)
    if not cfg.tie_word_embeddings:
        shapes["output_layer.weight"] = (pv // tp, h)
    return shapes


def _validate_rank(sd: Mapping[str, torch.Tensor], cfg: LlamaConfig, tp: int, where: str) -> None:
    expected = rank_tensor_shapes(cfg, tp)
    for key, shape in expected.items():
        if key not in sd:
            raise CheckpointError(f"{where}: missing tensor {key!r}")
        found = tuple(sd[key].shape)
        if found != shape:
            raise CheckpointError(
                f"{where}: tensor {key!r} has shape {found}, expected {shape} for config "
                f"{cfg.name!r} at TP={tp}")
    for key in sd:
        if key not in expected and not is_extra_state(key):
            if key == "output_layer.weight" and cfg.tie_word_embeddings:
                raise CheckpointError(f"{where}: tensor 'output_layer.weight' present but the config "
                                      "ties embeddings (tie_word_embeddings=True)")
            _rule(key)


def validate_rank_state_dicts(rank_sds: Sequence[Mapping[str, torch.Tensor]], cfg: LlamaConfig,
                              source: str = "state dict") -> None:
    """Check a list of per-rank state dicts against ``cfg`` at TP = ``len(rank_sds)``.

    Raises ``CheckpointError`` naming the rank, tensor, expected and found shapes.
    Tensors beyond the contract are allowed when their module has a known layout.
    """
    tp = len(rank_sds)
    if tp == 0:
        raise CheckpointError(f"{source}: no tensor-parallel ranks")
    try:
        cfg.validate_tp(tp)
    except ConfigError as e:
        raise CheckpointError(f"{source}: {e}") from None
    for rank, sd in enumerate(rank_sds):
        _validate_rank(sd, cfg, tp, f"{source} (TP rank {rank} of {tp})")


def merge_tp(rank_sds: Sequence[Mapping[str, torch.Tensor]], cfg: LlamaConfig, *,
             complete: bool = True) -> dict[str, torch.Tensor]:
    """Per-rank state dicts -> one TP=1 state dict (vocab rows as padded for the source TP).

    ``complete=False`` merges any subset of a model's tensors laid out as its weights (an
    optimizer's moments of the trained tensors): no check against the config's contract,
    and replicated tensors are taken from rank 0 (their copies agree to rounding only)."""
    if complete:
        validate_rank_state_dicts(rank_sds, cfg)
    keys = [k for k in rank_sds[0] if not is_extra_state(k)]
    for rank, sd in enumerate(rank_sds[1:], start=1):
        other = {k for k in sd if not is_extra_state(k)}
        if other != set(keys):
            diff = sorted(other.symmetric_difference(keys))
            raise CheckpointError(f"TP rank {rank} and rank 0 hold different tensors (first: {diff[0]!r})")
    full: dict[str, torch.Tensor] = {}
    for key in keys:
        parts = [sd[key] for sd in rank_sds]
        rule = _rule(key)
        if len(parts) == 1:
            full[key] = parts[0]
        elif rule == REPLICATED or (rule == ROW and parts[0].dim() < 2):
            for rank, p in enumerate(parts[1:] if complete else (), start=1):
                if not torch.equal(p, parts[0]):
                    raise CheckpointError(f"tensor {key!r}: replicated copy on TP rank {rank} differs from rank 0")
            full[key] = parts[0]
        elif rule in (VOCAB, COLUMN):
            full[key] = torch.cat(parts, dim=0)
        elif rule == ROW:
            full[key] = torch.cat(parts, dim=1)
        elif rule == GATED:
            halves = [p.chunk(2, dim=0) for p in parts]
            full[key] = torch.cat([h[0] for h in halves] + [h[1] for h in halves], dim=0)
    return full


def split_tp(full: Mapping[str, torch.Tensor], cfg: LlamaConfig, tp: int) -> list[dict[str, torch.Tensor]]:
    """One TP=1 state dict -> ``tp`` per-rank state dicts (tensors may be views of ``full``).

    Vocabulary tables are re-padded to Megatron's size for ``tp``: rows past the
    source's are zero, rows past the new padded size (padding only) are dropped.
    """
    try:
        cfg.validate_tp(tp)
    except ConfigError as e:
        raise CheckpointError(str(e)) from None
    pv = cfg.padded_vocab_size(tp)
    out: list[dict[str, torch.Tensor]] = [{} for _ in range(tp)]
    for key, t in full.items():
        if is_extra_state(key):
            continue
        rule = _rule(key)
        if rule == REPLICATED or (rule == ROW and t.dim() < 2):
            parts = [t] * tp
        elif rule == VOCAB:
            if t.shape[0] < cfg.vocab_size:
                raise CheckpointError(f"tensor {key!r}: {t.shape[0]} rows, fewer than vocab_size {cfg.vocab_size}")
            rows = t[:pv]
            if rows.shape[0] < pv:
                pad = rows.new_zeros((pv - rows.shape[0],) + tuple(rows.shape[1:]))
                rows = torch.cat([rows, pad], dim=0)
            parts = list(rows.chunk(tp, dim=0))
        elif rule == COLUMN:
            parts = list(t.chunk(tp, dim=0))
        elif rule == ROW:
            parts = list(t.chunk(tp, dim=1))
        else:  # GATED: [gate; up] -> per rank [gate_r; up_r]
            gate, up = t.chunk(2, dim=0)
            parts = [torch.cat([g, u], dim=0) for g, u in zip(gate.chunk(tp, dim=0), up.chunk(tp, dim=0))]
        for rank in range(tp):
            out[rank][key] = parts[rank]
    return out


def reshard(rank_sds: Sequence[Mapping[str, torch.Tensor]], cfg: LlamaConfig, new_tp: int) -> list[dict[str, torch.Tensor]]:
    """Per-rank state dicts at any TP -> per-rank state dicts at ``new_tp``."""
    return split_tp(merge_tp(rank_sds, cfg), cfg, new_tp)

