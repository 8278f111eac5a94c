"""Hugging Face LLaMA checkpoints: ``config.json`` <-> ``LlamaConfig`` and directory I/O.

A Hugging Face directory holds ``config.json``, the weights (``model.safetensors``,
sharded ``model-XXXXX-of-YYYYY.safetensors`` with ``model.safetensors.index.json``, or
the older ``pytorch_model*.bin``) and the tokenizer files. Reading never unpickles
arbitrary objects (``torch.load(weights_only=True)`` or safetensors); writing produces
safetensors that ``transformers.LlamaForCausalLM.from_pretrained`` loads, and is atomic:
everything goes to a temporary sibling directory renamed into place at the end.
"""
from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from megatron_ext.checkpoint.files import (commit_output_dir, copy_tokenizer, owned, prepare_output_dir)
from megatron_ext.checkpoint.layout import CheckpointError, parse_dtype
from megatron_ext.checkpoint.resharding import merge_tp, split_tp
from megatron_ext.models.config import LLAMA3_ROPE_SCALING, ConfigError, LlamaConfig

CONFIG_NAME = "config.json"
SAFE_WEIGHTS = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
BIN_WEIGHTS = "pytorch_model.bin"
BIN_INDEX = "pytorch_model.bin.index.json"
DEFAULT_SHARD_BYTES = 5 * 1024 ** 3
_HF_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


# --------------------------------------------------------------------------- config


def from_hf_config(hf: Mapping[str, Any], name: str | None = None) -> LlamaConfig:
    """A Hugging Face LLaMA ``config.json`` (as a dict) -> ``LlamaConfig``.

    Rejects what our model cannot represent (biases, another activation, a head
    dimension other than hidden/heads, a rotary scaling other than megatron-core's
    "llama3") with a message naming the field.
    """
    model_type = hf.get("model_type")
    if model_type not in (None, "llama"):
        raise CheckpointError(f"config.json: model_type {model_type!r} is not a LLaMA model (expected 'llama')")
    archs = hf.get("architectures") or []
    if archs and not any(a == "LlamaForCausalLM" for a in archs):
        raise CheckpointError(f"config.json: architectures {archs} do not include LlamaForCausalLM")
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size"):
        if key not in hf:
            raise CheckpointError(f"config.json: missing field {key!r}")
    act = hf.get("hidden_act", "silu")
    if act != "silu":
        raise CheckpointError(f"config.json: hidden_act {act!r} is not supported (LLaMA uses 'silu')")
    for flag in ("attention_bias", "mlp_bias"):
        if hf.get(flag):
            raise CheckpointError(f"config.json: {flag}=true is not supported (LLaMA has no biases)")
    heads = int(hf["num_attention_heads"])
    hidden = int(hf["hidden_size"])
    head_dim = hf.get("head_dim")
    if head_dim is not None and hidden % heads == 0 and int(head_dim) != hidden // heads:
        raise CheckpointError(
            f"config.json: head_dim {head_dim} differs from hidden_size/num_attention_heads "
            f"({hidden}/{heads}); not supported")
    rope = hf.get("rope_parameters") or {}
    rotary_base = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
    return LlamaConfig(
        name=name or str(hf.get("_name_or_path") or "hf-llama"),
        num_layers=int(hf["num_hidden_layers"]),
        hidden_size=hidden,
        ffn_hidden_size=int(hf["intermediate_size"]),
        num_attention_heads=heads,
        num_query_groups=int(hf.get("num_key_value_heads") or heads),
        vocab_size=int(hf["vocab_size"]),
        max_position_embeddings=int(hf.get("max_position_embeddings", 2048)),
        rotary_base=float(rotary_base),
        rope_scaling_factor=_rope_scaling_factor(hf),
        norm_epsilon=float(hf.get("rms_norm_eps", 1e-6)),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
    )


def _rope_scaling_factor(hf: Mapping[str, Any]) -> float | None:
    """The "llama3" scaling factor of ``rope_scaling`` (transformers 4.x) and/or
    ``rope_parameters`` (5.x); None for unscaled rotary embeddings. Anything megatron-core's
    scaling cannot reproduce is refused, naming the field."""
    factors = {}
    for where in ("rope_parameters", "rope_scaling"):
        params = hf.get(where) or {}
        if not isinstance(params, Mapping):
            raise CheckpointError(f"config.json: {where} must be an object, got {params!r}")
        rope_type = params.get("rope_type", params.get("type", "default"))
        if rope_type in ("default", None):
            continue
        if rope_type != "llama3":
            raise CheckpointError(f"config.json: {where}.rope_type {rope_type!r} is not supported "
                                  "(unscaled rotary embeddings or LLaMA-3.1's 'llama3' scaling)")
        factor = params.get("factor")
        if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not 1 <= factor < math.inf:
            raise CheckpointError(f"config.json: {where}.factor {factor!r} is not supported (a number >= 1)")
        for key, fixed in LLAMA3_ROPE_SCALING.items():
            value = params.get(key)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value != fixed:
                raise CheckpointError(f"config.json: {where}.{key} {value!r} is not supported: megatron-core's "
                                      f"'llama3' rotary scaling fixes it at {fixed:g}")
        factors[where] = float(factor)
    if len(set(factors.values())) > 1:
        raise CheckpointError("config.json: rope_parameters.factor {rope_parameters} and rope_scaling.factor "
                              "{rope_scaling} differ".format(**factors))
    return next(iter(factors.values()), None)


def hf_rope_scaling(cfg: LlamaConfig) -> dict[str, Any] | None:
    """The ``rope_scaling`` dict of ``cfg``'s ``config.json`` (None when unscaled)."""
    if cfg.rope_scaling_factor is None:
        return None
    return {"rope_type": "llama3", "factor": float(cfg.rope_scaling_factor), **LLAMA3_ROPE_SCALING}


def to_hf_config(cfg: LlamaConfig, dtype: torch.dtype | None = None,
                 bos_token_id: int | None = None, eos_token_id: int | None = None) -> dict[str, Any]:
    """``LlamaConfig`` -> a ``config.json`` dict for ``LlamaForCausalLM``.

    The rotary base (and LLaMA-3.1's scaling) is written both as ``rope_theta`` and
    ``rope_scaling`` (transformers 4.x) and in ``rope_parameters`` (transformers 5.x) so
    either reads the same model.
    """
    scaling = hf_rope_scaling(cfg)
    out: dict[str, Any] = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_act": "silu",
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.ffn_hidden_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_query_groups,
        "head_dim": cfg.head_dim,
        "vocab_size": cfg.vocab_size,
        "max_position_embeddings": cfg.max_position_embeddings,
        "rms_norm_eps": cfg.norm_epsilon,
        "rope_theta": cfg.rotary_base,
        **({"rope_scaling": scaling} if scaling else {}),
        "rope_parameters": {**(scaling or {"rope_type": "default"}), "rope_theta": cfg.rotary_base},
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "attention_bias": False,
        "mlp_bias": False,
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "use_cache": True,
    }
    if bos_token_id is not None:
        out["bos_token_id"] = int(bos_token_id)
    if eos_token_id is not None:
        out["eos_token_id"] = int(eos_token_id)
    if dtype is not None:
        out["torch_dtype"] = _HF_DTYPE_NAMES[dtype]
    return out


# --------------------------------------------------------------------------- tensor names


def hf_tensor_shapes(cfg: LlamaConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor of a Hugging Face LLaMA state dict with its shape."""
    h, d, ffn, v = cfg.hidden_size, cfg.head_dim, cfg.ffn_hidden_size, cfg.vocab_size
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (v, h), "model.norm.weight": (h,)}
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}."
        shapes.update({
            p + "input_layernorm.weight": (h,),
            p + "self_attn.q_proj.weight": (cfg.num_attention_heads * d, h),
            p + "self_attn.k_proj.weight": (cfg.num_query_groups * d, h),
            p + "self_attn.v_proj.weight": (cfg.num_query_groups * d, h),
            p + "self_attn.o_proj.weight": (h, cfg.num_attention_heads * d),
            p + "post_attention_layernorm.weight": (h,),
            p + "mlp.gate_proj.weight": (ffn, h),
            p + "mlp.up_proj.weight": (ffn, h),
            p + "mlp.down_proj.weight": (h, ffn),
        })
    if not cfg.tie_word_embeddings:
        shapes["lm_head.weight"] = (v, h)
    return shapes


# --------------------------------------------------------------------------- reading


def _read_json(path: Path) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: file not found") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: invalid JSON ({e})") from None


def read_hf_config(hf_dir: str | os.PathLike, name: str | None = None) -> LlamaConfig:
    path = Path(hf_dir) / CONFIG_NAME
    try:
        return from_hf_config(_read_json(path), name=name or Path(hf_dir).resolve().name)
    except CheckpointError as e:
        msg = str(e)
        if not msg.startswith(str(path)):  # from_hf_config's "config.json: ..." names the file in full
            msg = f"{path}: {msg.removeprefix(f'{CONFIG_NAME}: ')}"
        raise CheckpointError(msg) from None
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: {e}") from None


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except FileNotFoundError:
        raise CheckpointError(f"{path}: weight file not found") from None
    except Exception as e:  # safetensors raises its own error types for corrupt files
        raise CheckpointError(f"{path}: cannot read safetensors file ({e})") from None


def _load_bin(path: Path) -> dict[str, torch.Tensor]:
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: weight file not found") from None
    except Exception as e:
        raise CheckpointError(f"{path}: cannot read weights with torch.load(weights_only=True) ({e})") from None
    if not isinstance(sd, dict):
        raise CheckpointError(f"{path}: expected a state dict, found {type(sd).__name__}")
    return sd


def _load_indexed(index_path: Path, loader) -> dict[str, torch.Tensor]:
    index = _read_json(index_path)
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{index_path}: no 'weight_map' in index")
    out: dict[str, torch.Tensor] = {}
    for fname in sorted(set(weight_map.values())):
        shard = index_path.parent / fname
        if not shard.is_file():
            raise CheckpointError(f"{index_path}: shard {shard} is missing")
        out.update(loader(shard))
    missing = sorted(set(weight_map) - set(out))
    if missing:
        raise CheckpointError(f"{index_path}: tensor {missing[0]!r} listed in the index is in no shard")
    return out


def load_hf_state_dict(hf_dir: str | os.PathLike) -> dict[str, torch.Tensor]:
    """All weights of a Hugging Face directory (safetensors preferred over .bin)."""
    d = Path(hf_dir)
    if not d.is_dir():
        raise CheckpointError(f"{d}: not a directory")
    if (d / SAFE_INDEX).is_file():
        return _load_indexed(d / SAFE_INDEX, _load_safetensors)
    if (d / SAFE_WEIGHTS).is_file():
        return _load_safetensors(d / SAFE_WEIGHTS)
    if (d / BIN_INDEX).is_file():
        return _load_indexed(d / BIN_INDEX, _load_bin)
    if (d / BIN_WEIGHTS).is_file():
        return _load_bin(d / BIN_WEIGHTS)
    raise CheckpointError(
        f"{d}: no weights found (expected {SAFE_WEIGHTS}, {SAFE_INDEX}, {BIN_WEIGHTS} or {BIN_INDEX})")


def read_hf_checkpoint(hf_dir: str | os.PathLike) -> tuple[LlamaConfig, dict[str, torch.Tensor]]:
    """(config, state dict) of a Hugging Face LLaMA directory."""
    return read_hf_config(hf_dir), load_hf_state_dict(hf_dir)



def special_token_ids(tokenizer_dir: str | os.PathLike) -> tuple[int | None, int | None]:
    """(bos, eos) ids from a tokenizer directory, when they can be found cheaply."""
    d = Path(tokenizer_dir)
    bos = eos = None
    tc = d / "tokenizer_config.json"
    tj = d / "tokenizer.json"
    if tc.is_file() and tj.is_file():
        conf = _read_json(tc)
        tok = _read_json(tj)
        model_vocab = tok.get("model", {}).get("vocab")
        vocab = dict(model_vocab) if isinstance(model_vocab, dict) else {}
        vocab.update({t["content"]: t["id"] for t in tok.get("added_tokens", [])})

        def _id(tok):
            if isinstance(tok, dict):
                tok = tok.get("content")
            return vocab.get(tok) if isinstance(tok, str) else None

        bos, eos = _id(conf.get("bos_token")), _id(conf.get("eos_token"))
    elif (d / "tokenizer.model").is_file():
        import sentencepiece as spm

        sp = spm.SentencePieceProcessor(model_file=str(d / "tokenizer.model"))
        bos = sp.bos_id() if sp.bos_id() >= 0 else None
        eos = sp.eos_id() if sp.eos_id() >= 0 else None
    return bos, eos



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

# --------------------------------------------------------------------------- writing

def _shard_plan(state_dict: Mapping[str, torch.Tensor], max_bytes: int) -> list[list[str]]:
    shards: list[list[str]] = [[]]
    size = 0
    for k, t in state_dict.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(k)
        size += nbytes
    return shards


def save_hf_checkpoint(out_dir: str | os.PathLike, cfg: LlamaConfig, state_dict: Mapping[str, torch.Tensor],
                       dtype: str | torch.dtype | None = None, tokenizer_dir: str | os.PathLike | None = None,
                       overwrite: bool = False, max_shard_bytes: int = DEFAULT_SHARD_BYTES,
                       extra_files: Mapping[str, str] | None = None) -> Path:
    """Write a Hugging Face LLaMA directory (safetensors + config.json + tokenizer).

    ``dtype`` casts floating tensors (default: keep them). Weights larger than
    ``max_shard_bytes`` are split into ``model-0000i-of-0000n.safetensors`` with an
    index. ``extra_files`` maps file names to text written beside (e.g. a
    generated tokenizer.json). The directory appears complete or not at all.
    """
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    target = parse_dtype(dtype)
    expected = hf_tensor_shapes(cfg)
    missing = [k for k in expected if k not in state_dict]
    if missing:
        raise CheckpointError(f"state dict for {out_dir}: missing tensor {missing[0]!r}")
    unexpected = [k for k in state_dict if k not in expected
                  and not k.endswith("rotary_emb.inv_freq") and not (k == "lm_head.weight" and cfg.tie_word_embeddings)]
    if unexpected:
        raise CheckpointError(f"state dict for {out_dir}: tensor {unexpected[0]!r} is not part of a LLaMA model")
    tensors: dict[str, torch.Tensor] = {}
    for k, shape in expected.items():
        t = state_dict[k]
        if tuple(t.shape) != shape:
            raise CheckpointError(f"tensor {k!r}: expected shape {shape}, found {tuple(t.shape)}")
        if target is not None and t.is_floating_point():
            t = t.to(target)
        tensors[k] = owned(t.to("cpu"))
    out_dtype = next(iter(tensors.values())).dtype

    tmp = prepare_output_dir(out_dir, overwrite)
    try:
        plan = _shard_plan(tensors, max_shard_bytes)
        meta = {"format": "pt"}
        if len(plan) == 1:
            save_file(tensors, str(tmp / SAFE_WEIGHTS), metadata=meta)
        else:
            weight_map = {}
            for i, keys in enumerate(plan):
                fname = f"model-{i + 1:05d}-of-{len(plan):05d}.safetensors"
                save_file({k: tensors[k] for k in keys}, str(tmp / fname), metadata=meta)
                weight_map.update({k: fname for k in keys})
            total = sum(t.numel() * t.element_size() for t in tensors.values())
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (tmp / SAFE_INDEX).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
        copy_tokenizer(tokenizer_dir, tmp)
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text, encoding="utf-8")
        bos, eos = special_token_ids(tmp)
        hf_cfg = to_hf_config(cfg, out_dtype, bos, eos)
        (tmp / CONFIG_NAME).write_text(json.dumps(hf_cfg, indent=2) + "\n", encoding="utf-8")
        if bos is not None or eos is not None:
            gen = {k: v for k, v in (("bos_token_id", bos), ("eos_token_id", eos)) if v is not None}
            (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n", encoding="utf-8")
        commit_output_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir
