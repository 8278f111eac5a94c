"""Our checkpoint format, Hugging Face <-> megatron-core conversion and TP resharding.

The unit of exchange is the per-tensor-parallel-rank state dict of megatron-core's
``GPTModel`` built from our layer spec (names in ``rank_tensor_shapes``). Conversion
and resharding are pure tensor operations: no GPU, no process group.

On disk a checkpoint is laid out as Megatron users expect::

    <dir>/latest_checkpointed_iteration.txt        tracker, written last
    <dir>/iter_0000000/mp_rank_00/model_optim_rng.pt   one file per TP rank
    <dir>/iter_0000000/checkpoint.json              config, TP size, dtype, tokenizer
    <dir>/iter_0000000/tokenizer/...                the tokenizer files

Each iteration directory is written under a temporary name and renamed into place,
then the tracker is replaced atomically, so a reader never sees a partial checkpoint.
Files are read with ``torch.load(weights_only=True)`` only.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from megatron_ext.models.config import ConfigError, LlamaConfig
from megatron_ext.models.hf import (
    CheckpointError,
    atomic_write_text,
    copy_tokenizer,
    dtype_name,
    from_hf_config,
    hf_tensor_shapes,
    owned,
    parse_dtype,
    publish_permissions,
    read_hf_checkpoint,
    save_hf_checkpoint,
    to_hf_config,
    tokenizer_files,
)

__all__ = [
    "CheckpointError", "CheckpointInfo", "from_hf_config", "to_hf_config",
    "hf_to_mcore", "mcore_to_hf", "reshard", "merge_tp", "split_tp",
    "rank_tensor_shapes", "validate_rank_state_dicts",
    "save_checkpoint", "load_checkpoint", "load_rank_state_dict", "read_checkpoint_info",
    "model_state_dict", "load_into_model", "infer_tokenizer_type", "convert_checkpoint",
]

MODEL_FILE = "model_optim_rng.pt"
TRACKER_FILE = "latest_checkpointed_iteration.txt"
INFO_FILE = "checkpoint.json"
TOKENIZER_DIR = "tokenizer"
FORMAT_NAME = "megatron_ext"
FORMAT_VERSION = 1
CHECKPOINT_VERSION = 3.0  # Megatron-LM's current value for the same field
_INFO_FIELDS = ("format", "format_version", "iteration", "tensor_model_parallel_size",
                "pipeline_model_parallel_size", "dtype", "padded_vocab_size", "config", "tokenizer")

# --------------------------------------------------------------------------- partitioning
# How each module's tensors are split over TP ranks. Rules are looked up by the module
# path (the key without its last component) so any tensor a module owns (a weight, a
# sparsity mask of the same layout) is resharded the same way.
VOCAB, COLUMN, GATED, ROW, REPLICATED = "vocab", "column", "gated", "row", "replicated"
_RULES = (
    (re.compile(r"^embedding\.word_embeddings$"), VOCAB),
    (re.compile(r"^output_layer$"), VOCAB),
    (re.compile(r"^decoder\.layers\.\d+\.self_attention\.linear_qkv$"), COLUMN),
    (re.compile(r"^decoder\.layers\.\d+\.self_attention\.linear_proj$"), ROW),
    (re.compile(r"^decoder\.layers\.\d+\.mlp\.linear_fc1$"), GATED),
    (re.compile(r"^decoder\.layers\.\d+\.mlp\.linear_fc2$"), ROW),
    (re.compile(r"^decoder\.layers\.\d+\.(input_layernorm|pre_mlp_layernorm)$"), REPLICATED),
    (re.compile(r"^decoder\.final_layernorm$"), REPLICATED),
)


def _rule(key: str) -> str:
    module = key.rsplit(".", 1)[0]
    for pattern, rule in _RULES:
        if pattern.match(module):
            return rule
    raise CheckpointError(f"tensor {key!r}: no tensor-parallel layout known for module {module!r}")


def _is_extra_state(key: str) -> bool:
    return key.endswith("_extra_state")


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
        if key not in expected and not _is_extra_state(key):
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


def merge_tp(rank_sds: Sequence[Mapping[str, torch.Tensor]], cfg: LlamaConfig) -> dict[str, torch.Tensor]:
    """Per-rank state dicts -> one TP=1 state dict (vocab rows as padded for the source TP)."""
    validate_rank_state_dicts(rank_sds, cfg)
    keys = [k for k in rank_sds[0] if not _is_extra_state(k)]
    for rank, sd in enumerate(rank_sds[1:], start=1):
        other = {k for k in sd if not _is_extra_state(k)}
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
            for rank, p in enumerate(parts[1:], start=1):
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
        if _is_extra_state(key):
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


# --------------------------------------------------------------------------- HF <-> mcore


def _check_hf(hf_sd: Mapping[str, torch.Tensor], cfg: LlamaConfig) -> None:
    expected = hf_tensor_shapes(cfg)
    for key, shape in expected.items():
        if key not in hf_sd:
            raise CheckpointError(f"Hugging Face state dict: missing tensor {key!r} for config {cfg.name!r}")
        found = tuple(hf_sd[key].shape)
        if found != shape:
            raise CheckpointError(f"Hugging Face state dict: tensor {key!r} has shape {found}, expected {shape} "
                                  f"for config {cfg.name!r}")
    for key in hf_sd:
        if key in expected or key.endswith("rotary_emb.inv_freq"):
            continue
        if key == "lm_head.weight" and cfg.tie_word_embeddings:
            if not torch.equal(hf_sd[key], hf_sd["model.embed_tokens.weight"]):
                raise CheckpointError("Hugging Face state dict: lm_head.weight differs from model.embed_tokens.weight "
                                      "but the config ties them (tie_word_embeddings=True)")
            continue
        raise CheckpointError(f"Hugging Face state dict: unexpected tensor {key!r} (not part of a LLaMA model)")


def hf_to_mcore(hf_state_dict: Mapping[str, torch.Tensor], cfg: LlamaConfig, tp: int) -> list[dict[str, torch.Tensor]]:
    """Hugging Face ``LlamaForCausalLM`` state dict -> ``tp`` megatron-core rank state dicts.

    Q/K/V are packed in megatron's grouped layout (per query group: its query heads,
    then its key head, then its value head). HF's q/k rows are already in the
    rotate-half order megatron's non-interleaved rotary uses, so no permutation.
    """
    try:
        cfg.validate_tp(tp)
    except ConfigError as e:
        raise CheckpointError(str(e)) from None
    _check_hf(hf_state_dict, cfg)
    d, ng = cfg.head_dim, cfg.num_query_groups
    per_group = cfg.num_attention_heads // ng
    h = cfg.hidden_size
    full: dict[str, torch.Tensor] = {"embedding.word_embeddings.weight": hf_state_dict["model.embed_tokens.weight"]}
    for i in range(cfg.num_layers):
        src, dst = f"model.layers.{i}.", f"decoder.layers.{i}."
        q = hf_state_dict[src + "self_attn.q_proj.weight"].reshape(ng, per_group * d, h)
        k = hf_state_dict[src + "self_attn.k_proj.weight"].reshape(ng, d, h)
        v = hf_state_dict[src + "self_attn.v_proj.weight"].reshape(ng, d, h)
        full[dst + "input_layernorm.weight"] = hf_state_dict[src + "input_layernorm.weight"]
        full[dst + "self_attention.linear_qkv.weight"] = torch.cat([q, k, v], dim=1).reshape(-1, h)
        full[dst + "self_attention.linear_proj.weight"] = hf_state_dict[src + "self_attn.o_proj.weight"]
        full[dst + "pre_mlp_layernorm.weight"] = hf_state_dict[src + "post_attention_layernorm.weight"]
        full[dst + "mlp.linear_fc1.weight"] = torch.cat(
            [hf_state_dict[src + "mlp.gate_proj.weight"], hf_state_dict[src + "mlp.up_proj.weight"]], dim=0)
        full[dst + "mlp.linear_fc2.weight"] = hf_state_dict[src + "mlp.down_proj.weight"]
    full["decoder.final_layernorm.weight"] = hf_state_dict["model.norm.weight"]
    if not cfg.tie_word_embeddings:
        full["output_layer.weight"] = hf_state_dict["lm_head.weight"]
    return split_tp(full, cfg, tp)


def mcore_to_hf(rank_state_dicts: Sequence[Mapping[str, torch.Tensor]], cfg: LlamaConfig) -> dict[str, torch.Tensor]:
    """megatron-core rank state dicts (any TP) -> Hugging Face state dict (vocab padding trimmed).

    Tensors may be views of the inputs; ``save_hf_checkpoint`` compacts them.
    """
    full = merge_tp(rank_state_dicts, cfg)
    d, ng = cfg.head_dim, cfg.num_query_groups
    per_group = cfg.num_attention_heads // ng
    h, v = cfg.hidden_size, cfg.vocab_size
    hf: dict[str, torch.Tensor] = {"model.embed_tokens.weight": full["embedding.word_embeddings.weight"][:v]}
    for i in range(cfg.num_layers):
        src, dst = f"decoder.layers.{i}.", f"model.layers.{i}."
        qkv = full[src + "self_attention.linear_qkv.weight"].reshape(ng, (per_group + 2) * d, h)
        q, k, vv = qkv.split([per_group * d, d, d], dim=1)
        gate, up = full[src + "mlp.linear_fc1.weight"].chunk(2, dim=0)
        hf[dst + "input_layernorm.weight"] = full[src + "input_layernorm.weight"]
        hf[dst + "self_attn.q_proj.weight"] = q.reshape(-1, h)
        hf[dst + "self_attn.k_proj.weight"] = k.reshape(-1, h)
        hf[dst + "self_attn.v_proj.weight"] = vv.reshape(-1, h)
        hf[dst + "self_attn.o_proj.weight"] = full[src + "self_attention.linear_proj.weight"]
        hf[dst + "post_attention_layernorm.weight"] = full[src + "pre_mlp_layernorm.weight"]
        hf[dst + "mlp.gate_proj.weight"] = gate
        hf[dst + "mlp.up_proj.weight"] = up
        hf[dst + "mlp.down_proj.weight"] = full[src + "mlp.linear_fc2.weight"]
    hf["model.norm.weight"] = full["decoder.final_layernorm.weight"]
    if not cfg.tie_word_embeddings:
        hf["lm_head.weight"] = full["output_layer.weight"][:v]
    return hf


# --------------------------------------------------------------------------- model <-> state dict


def model_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """This rank's tensors of a ``GPTModel`` on the CPU, without ``_extra_state`` entries."""
    return {k: owned(v.to("cpu")) for k, v in model.state_dict().items()
            if not _is_extra_state(k) and isinstance(v, torch.Tensor)}


def load_into_model(model: torch.nn.Module, state_dict: Mapping[str, torch.Tensor]) -> None:
    """Copy one rank's state dict into ``model`` (strict; ``_extra_state`` ignored)."""
    own = {k: v for k, v in model.state_dict().items() if not _is_extra_state(k)}
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(k for k in state_dict if k not in own and not _is_extra_state(k))
    if missing:
        raise CheckpointError(f"state dict lacks model tensor {missing[0]!r} ({len(missing)} missing)")
    if unexpected:
        raise CheckpointError(f"state dict has tensor {unexpected[0]!r} the model does not ({len(unexpected)} extra)")
    for k, v in own.items():
        if tuple(v.shape) != tuple(state_dict[k].shape):
            raise CheckpointError(f"tensor {k!r}: model expects shape {tuple(v.shape)}, state dict has "
                                  f"{tuple(state_dict[k].shape)}")
    model.load_state_dict({k: state_dict[k] for k in own}, strict=False)


# --------------------------------------------------------------------------- on-disk format


@dataclass
class CheckpointInfo:
    """What ``checkpoint.json`` says about one saved iteration."""
    iter_dir: Path
    config: LlamaConfig
    tensor_parallel_size: int
    dtype: str
    iteration: int
    tokenizer_type: str | None = None
    tokenizer_dir: Path | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def shard_path(self, rank: int) -> Path:
        return shard_path(self.iter_dir, rank)


def iteration_dir_name(iteration: int) -> str:
    return f"iter_{iteration:07d}"


def shard_path(iter_dir: Path, rank: int) -> Path:
    return Path(iter_dir) / f"mp_rank_{rank:02d}" / MODEL_FILE


def infer_tokenizer_type(tokenizer_dir: str | os.PathLike | None) -> str | None:
    """The data layer's tokenizer type for a tokenizer directory.

    A SentencePiece ``tokenizer.model`` (LLaMA-1/2 style) -> ``Llama2Tokenizer``
    (BOS prepended, as the legacy Megatron-LM recipe); a ``tokenizer.json`` alone ->
    ``HuggingFaceTokenizer``.
    """
    if tokenizer_dir is None:
        return None
    d = Path(tokenizer_dir)
    if (d / "tokenizer.model").is_file():
        return "Llama2Tokenizer"
    if (d / "tokenizer.json").is_file():
        return "HuggingFaceTokenizer"
    return None


def megatron_args(cfg: LlamaConfig, tp: int, dtype: torch.dtype) -> dict[str, Any]:
    """Megatron-LM argument names for this model (stored as a plain dict, not a Namespace)."""
    return {
        "num_layers": cfg.num_layers, "hidden_size": cfg.hidden_size, "ffn_hidden_size": cfg.ffn_hidden_size,
        "num_attention_heads": cfg.num_attention_heads, "group_query_attention": cfg.num_query_groups != cfg.num_attention_heads,
        "num_query_groups": cfg.num_query_groups, "kv_channels": cfg.head_dim,
        "max_position_embeddings": cfg.max_position_embeddings,
        "position_embedding_type": "rope", "rotary_base": cfg.rotary_base, "rotary_interleaved": False,
        "normalization": "RMSNorm", "norm_epsilon": cfg.norm_epsilon, "swiglu": True,
        "add_bias_linear": False, "untie_embeddings_and_output_weights": not cfg.tie_word_embeddings,
        "vocab_size": cfg.vocab_size, "padded_vocab_size": cfg.padded_vocab_size(tp),
        "make_vocab_size_divisible_by": cfg.make_vocab_size_divisible_by,
        "tensor_model_parallel_size": tp, "pipeline_model_parallel_size": 1,
        "params_dtype": str(dtype).replace("torch.", ""), "bf16": dtype == torch.bfloat16, "fp16": dtype == torch.float16,
    }


def _floating_dtype(sd: Mapping[str, torch.Tensor]) -> torch.dtype:
    for t in sd.values():
        if isinstance(t, torch.Tensor) and t.is_floating_point():
            return t.dtype
    return torch.float32


def finish_iteration_dir(tmp: Path, final: Path, cfg: LlamaConfig, *, iteration: int, tp: int,
                         dtype: torch.dtype, tokenizer_type: str | None, tokenizer_files: Sequence[str],
                         extra_info: Mapping[str, Any] | None = None) -> None:
    """Write ``checkpoint.json`` into the complete temporary directory ``tmp`` and move it to
    ``final`` (replacing an older one only once the new one is in place). The caller writes the
    tracker file afterwards."""
    info = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "iteration": iteration,
        "tensor_model_parallel_size": tp,
        "pipeline_model_parallel_size": 1,
        "dtype": dtype_name(dtype),
        "padded_vocab_size": cfg.padded_vocab_size(tp),
        "config": cfg.to_dict(),
        "tokenizer": ({"type": tokenizer_type, "dir": TOKENIZER_DIR, "files": list(tokenizer_files)}
                      if tokenizer_type is not None else None),
    }
    info.update(extra_info or {})
    (tmp / INFO_FILE).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    publish_permissions(tmp)
    save_dir = final.parent
    if final.exists():
        trash = Path(tempfile.mkdtemp(prefix=f".{final.name}.old-", dir=save_dir))
        os.rename(final, trash / "d")
        os.rename(tmp, final)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.rename(tmp, final)


def save_checkpoint(save_dir: str | os.PathLike, rank_state_dicts: Sequence[Mapping[str, torch.Tensor]],
                    cfg: LlamaConfig, *, iteration: int = 0, dtype: str | torch.dtype | None = None,
                    tokenizer_dir: str | os.PathLike | None = None, tokenizer_type: str | None = None,
                    extra_info: Mapping[str, Any] | None = None, overwrite: bool = False) -> Path:
    """Write ``rank_state_dicts`` (one per TP rank) as iteration ``iteration`` of ``save_dir``.

    ``dtype`` casts floating tensors; ``tokenizer_dir``'s tokenizer files are copied
    into the checkpoint; ``extra_info`` is merged into checkpoint.json. Returns the
    iteration directory.
    """
    if not isinstance(iteration, int) or iteration < 0:
        raise CheckpointError(f"iteration must be a non-negative integer, got {iteration!r}")
    clash = sorted(set(extra_info or {}) & set(_INFO_FIELDS))
    if clash:
        raise CheckpointError(f"extra_info may not replace checkpoint.json field {clash[0]!r}")
    validate_rank_state_dicts(rank_state_dicts, cfg)
    tp = len(rank_state_dicts)
    target = parse_dtype(dtype)
    save_dir = Path(save_dir)
    if save_dir.exists() and not save_dir.is_dir():
        raise CheckpointError(f"{save_dir}: exists and is not a directory")
    try:
        save_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CheckpointError(f"{save_dir}: cannot create checkpoint directory ({e.strerror})") from None
    final = save_dir / iteration_dir_name(iteration)
    if final.exists() and not overwrite:
        raise CheckpointError(f"{final}: iteration already saved (pass overwrite to replace it)")
    if tokenizer_dir is not None and not tokenizer_files(tokenizer_dir):
        raise CheckpointError(f"{tokenizer_dir}: no tokenizer files found")
    tokenizer_type = tokenizer_type or infer_tokenizer_type(tokenizer_dir)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=save_dir))
    except OSError as e:
        raise CheckpointError(f"{save_dir}: cannot write checkpoint ({e.strerror})") from None
    try:
        out_dtype = None
        for rank, sd in enumerate(rank_state_dicts):
            # Learned mask logits stay fp32 whatever the weights are cast to.
            model = {k: owned((v.to(target) if target is not None and v.is_floating_point()
                               and not k.endswith(".mask_logits") else v).cpu())
                     for k, v in sd.items() if not _is_extra_state(k)}
            out_dtype = out_dtype or _floating_dtype(model)
            payload = {
                "model": model,
                "args": megatron_args(cfg, tp, out_dtype),
                "config": cfg.to_dict(),
                "iteration": iteration,
                "checkpoint_version": CHECKPOINT_VERSION,
                "tensor_model_parallel_rank": rank,
            }
            path = shard_path(tmp, rank)
            path.parent.mkdir()
            with open(path, "wb") as f:
                torch.save(payload, f)
                f.flush()
                os.fsync(f.fileno())
        tok_names: list[str] = []
        if tokenizer_dir is not None:
            (tmp / TOKENIZER_DIR).mkdir()
            tok_names = copy_tokenizer(tokenizer_dir, tmp / TOKENIZER_DIR)
        finish_iteration_dir(tmp, final, cfg, iteration=iteration, tp=tp, dtype=out_dtype,
                             tokenizer_type=tokenizer_type if tokenizer_dir is not None else None,
                             tokenizer_files=tok_names, extra_info=extra_info)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    atomic_write_text(save_dir / TRACKER_FILE, f"{iteration}\n")
    return final


def _resolve_iter_dir(path: Path, iteration: int | None) -> Path:
    if not path.exists():
        raise CheckpointError(f"{path}: checkpoint not found")
    if (path / INFO_FILE).is_file() and iteration is None:
        return path
    if iteration is None:
        tracker = path / TRACKER_FILE
        if not tracker.is_file():
            raise CheckpointError(f"{path}: not a checkpoint (no {TRACKER_FILE} and no {INFO_FILE})")
        text = tracker.read_text().strip()
        if text == "release":
            return path / "release"
        try:
            iteration = int(text)
        except ValueError:
            raise CheckpointError(f"{tracker}: expected an iteration number, found {text[:40]!r}") from None
    it_dir = path / iteration_dir_name(iteration)
    if not it_dir.is_dir():
        raise CheckpointError(f"{it_dir}: iteration directory missing")
    return it_dir


def read_checkpoint_info(path: str | os.PathLike, iteration: int | None = None) -> CheckpointInfo:
    """Read and check ``checkpoint.json`` (``path``: checkpoint or iteration directory)."""
    it_dir = _resolve_iter_dir(Path(path), iteration)
    info_path = it_dir / INFO_FILE
    try:
        raw = json.loads(info_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{info_path}: file not found (not a {FORMAT_NAME} checkpoint)") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{info_path}: invalid JSON ({e})") from None
    if raw.get("format") != FORMAT_NAME:
        raise CheckpointError(f"{info_path}: format {raw.get('format')!r}, expected {FORMAT_NAME!r}")
    if raw.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{info_path}: format_version {raw.get('format_version')!r}, "
                              f"this code reads {FORMAT_VERSION}")
    try:
        cfg = LlamaConfig.from_dict(raw["config"])
        tp = int(raw["tensor_model_parallel_size"])
        cfg.validate_tp(tp)
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{info_path}: {e}") from None
    tok = raw.get("tokenizer")
    extra = {k: v for k, v in raw.items() if k not in _INFO_FIELDS}
    return CheckpointInfo(
        iter_dir=it_dir, config=cfg, tensor_parallel_size=tp, dtype=str(raw.get("dtype")),
        iteration=int(raw.get("iteration", 0)),
        tokenizer_type=tok.get("type") if tok else None,
        tokenizer_dir=(it_dir / tok.get("dir", TOKENIZER_DIR)) if tok else None,
        extra=extra)


def _shard_dirs(it_dir: Path) -> list[str]:
    return sorted(p.name for p in it_dir.iterdir() if p.is_dir() and p.name.startswith("mp_rank_"))


def _load_shard(info: CheckpointInfo, rank: int) -> dict[str, torch.Tensor]:
    path = info.shard_path(rank)
    if not path.is_file():
        raise CheckpointError(f"missing shard {path} (checkpoint has TP={info.tensor_parallel_size})")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:
        raise CheckpointError(f"{path}: cannot read with torch.load(weights_only=True) ({e})") from None
    if not isinstance(payload, dict) or not isinstance(payload.get("model"), dict):
        raise CheckpointError(f"{path}: no 'model' state dict in file")
    if payload.get("config") is not None and payload["config"] != info.config.to_dict():
        raise CheckpointError(f"{path}: config differs from {info.iter_dir / INFO_FILE}")
    return payload["model"]


def load_checkpoint(path: str | os.PathLike, iteration: int | None = None
                    ) -> tuple[CheckpointInfo, list[dict[str, torch.Tensor]]]:
    """(info, every TP rank's state dict) of a saved checkpoint, checked against its config."""
    info = read_checkpoint_info(path, iteration)
    tp = info.tensor_parallel_size
    found = _shard_dirs(info.iter_dir)
    expected = [f"mp_rank_{r:02d}" for r in range(tp)]
    for name in expected:
        if name not in found:
            raise CheckpointError(f"missing shard {info.iter_dir / name / MODEL_FILE} "
                                  f"(checkpoint.json says TP={tp})")
    if len(found) != tp:
        extra = sorted(set(found) - set(expected))
        raise CheckpointError(f"{info.iter_dir}: {len(found)} TP shards on disk but checkpoint.json says TP={tp} "
                              f"(unexpected: {', '.join(extra)})")
    sds = [_load_shard(info, r) for r in range(tp)]
    validate_rank_state_dicts(sds, info.config, source=str(info.iter_dir))
    return info, sds


def load_rank_state_dict(path: str | os.PathLike, tp: int, rank: int, iteration: int | None = None
                         ) -> tuple[CheckpointInfo, dict[str, torch.Tensor]]:
    """The state dict for TP rank ``rank`` of ``tp``: read directly when the checkpoint
    was saved at ``tp``, otherwise every shard is read and resharded in memory."""
    info = read_checkpoint_info(path, iteration)
    if not 0 <= rank < tp:
        raise CheckpointError(f"TP rank {rank} out of range for TP={tp}")
    if info.tensor_parallel_size == tp:
        sd = _load_shard(info, rank)
        _validate_rank(sd, info.config, tp, str(info.shard_path(rank)))
        return info, sd
    info, sds = load_checkpoint(path, iteration)
    return info, reshard(sds, info.config, tp)[rank]


# --------------------------------------------------------------------------- conversion driver


def convert_checkpoint(source_format: str, target_format: str, load: str | os.PathLike, save: str | os.PathLike,
                       target_tp: int | None = None, dtype: str | None = None, overwrite: bool = False,
                       tokenizer_type: str | None = None) -> Path:
    """Convert between Hugging Face directories, GGUF files and our checkpoints.

    ``source_format``: ``hf`` | ``gguf`` | ``megatron``; ``target_format``: ``hf`` |
    ``megatron`` (``target_tp`` applies to megatron targets: default 1, or the
    source's TP for a megatron source).
    """
    if source_format not in ("hf", "gguf", "megatron"):
        raise CheckpointError(f"unknown source format {source_format!r} (hf, gguf, megatron)")
    if target_format not in ("hf", "megatron"):
        raise CheckpointError(f"unknown target format {target_format!r} (hf, megatron)")
    if target_format == "hf" and target_tp not in (None, 1):
        raise CheckpointError("--target-tp applies to megatron targets only")
    with tempfile.TemporaryDirectory(prefix="convert-tok-") as scratch:
        if source_format == "megatron":
            info, sds = load_checkpoint(load)
            cfg, tok_dir, tok_type = info.config, info.tokenizer_dir, tokenizer_type or info.tokenizer_type
            tp = target_tp or info.tensor_parallel_size
            if target_format == "hf":
                return save_hf_checkpoint(save, cfg, mcore_to_hf(sds, cfg), dtype=dtype,
                                          tokenizer_dir=tok_dir, overwrite=overwrite)
            if tp != info.tensor_parallel_size:
                sds = reshard(sds, cfg, tp)
            save_checkpoint(save, sds, cfg, iteration=info.iteration, dtype=dtype, tokenizer_dir=tok_dir,
                            tokenizer_type=tok_type, extra_info=info.extra, overwrite=overwrite)
            return Path(save)
        if source_format == "gguf":
            from megatron_ext.models.gguf_import import read_gguf

            model = read_gguf(load)
            cfg, hf_sd = model.config, model.state_dict
            tok_dir = Path(scratch)
            for name, text in model.tokenizer_files.items():
                (tok_dir / name).write_text(text, encoding="utf-8")
            dtype = dtype or "fp32"
        else:
            cfg, hf_sd = read_hf_checkpoint(load)
            tok_dir = Path(load) if tokenizer_files(load) else None
        if target_format == "hf":
            return save_hf_checkpoint(save, cfg, hf_sd, dtype=dtype, tokenizer_dir=tok_dir, overwrite=overwrite)
        sds = hf_to_mcore(hf_sd, cfg, target_tp or 1)
        save_checkpoint(save, sds, cfg, dtype=dtype, tokenizer_dir=tok_dir,
                        tokenizer_type=tokenizer_type, overwrite=overwrite)
        return Path(save)
