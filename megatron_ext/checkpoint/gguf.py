"""Import a llama.cpp GGUF file (llama architecture) as a Hugging Face LLaMA directory.

Weights are dequantized with ``gguf.quants.dequantize`` to float32. llama.cpp stores
the query and key projections with their rows permuted for its interleaved rotary
(``convert_hf_to_gguf.py``'s ``permute``); we undo that to get back Hugging Face's
rotate-half layout. A model without ``output.weight`` ties its embeddings.

The embedded tokenizer is rebuilt too: a GPT-2 style byte-level BPE
(``tokenizer.ggml.model == "gpt2"``: tokens, merges, special ids) becomes a
``tokenizer.json`` for the ``tokenizers`` library plus ``tokenizer_config.json`` and
``special_tokens_map.json``, loadable by transformers and by the data layer's
``HuggingFaceTokenizer``.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from megatron_ext.models.config import LlamaConfig
from megatron_ext.checkpoint import CheckpointError, save_hf_checkpoint


class GGUFImportError(CheckpointError):
    """A GGUF file we cannot import; the message names the file and the reason."""


# GGUF token types (llama.cpp's llama_token_type)
_TOKEN_NORMAL, _TOKEN_UNKNOWN, _TOKEN_CONTROL, _TOKEN_USER_DEFINED, _TOKEN_UNUSED, _TOKEN_BYTE = 1, 2, 3, 4, 5, 6

# GPT-2's pre-tokenization regex and LLaMA-3's.
_GPT2_SPLIT = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"""
_LLAMA3_SPLIT = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
                 r"""|\s*[\r\n]+|\s+(?!\S)|\s+""")

_LAYER_TENSORS = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GLOBAL_TENSORS = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}


@dataclass
class GGUFModel:
    """A GGUF file read into memory: config, Hugging Face state dict, tokenizer files."""
    config: LlamaConfig
    state_dict: dict[str, torch.Tensor]
    tokenizer_files: dict[str, str]
    metadata: dict[str, Any]


def unpermute_rotary(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo llama.cpp's Q/K row permutation (per head: interleaved pairs -> rotate-half halves)."""
    rows = w.shape[0]
    if rows % (2 * n_heads):
        raise GGUFImportError(f"cannot unpermute a tensor of {rows} rows over {n_heads} heads")
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def _field(reader, key: str, default: Any = None, required: bool = False, path: str = "") -> Any:
    f = reader.fields.get(key)
    if f is None:
        if required:
            raise GGUFImportError(f"{path}: GGUF metadata key {key!r} is missing")
        return default
    if len(f.types) > 1 or (f.types and f.types[0].name == "ARRAY"):
        return [f.contents(i) for i in range(len(f.data))]
    return f.contents()


_SCALAR_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}  # GGUFValueType -> bytes
_STRING, _ARRAY = 8, 9
_MAX_DIMS = 4


def _diagnose(path: Path) -> str | None:
    """Walk a GGUF file's layout (header, metadata, tensor infos, data extents) and say
    what is first wrong with it, naming the field or tensor; None when the layout holds.

    The gguf reader fails on a corrupt body with whatever numpy or struct error the bad
    bytes cause; this walk checks every length against the bytes that remain first.
    """
    import struct

    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    data = path.read_bytes() if path.stat().st_size < (1 << 20) else None
    with open(path, "rb") as f:
        size = path.stat().st_size
        head = f.read(min(size, 1 << 26)) if data is None else data
    pos = 0

    def take(n: int, what: str) -> bytes:
        nonlocal pos
        if n < 0 or pos + n > len(head):
            where = "the end of the file" if len(head) == size else "the first 64 MiB (metadata that large is corrupt)"
            raise _Bad(f"{what} at byte {pos} needs {n} bytes, past {where} ({size} bytes)")
        out = head[pos : pos + n]
        pos += n
        return out

    def u32(what: str) -> int:
        return struct.unpack("<I", take(4, what))[0]

    def u64(what: str) -> int:
        return struct.unpack("<Q", take(8, what))[0]

    def string(what: str) -> str:
        n = u64(f"{what}: length")
        if n > len(head) - pos:
            raise _Bad(f"{what}: string length {n} at byte {pos - 8} runs past the end of the file ({size} bytes)")
        raw = take(n, what)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise _Bad(f"{what}: not valid UTF-8 at byte {pos - n + e.start}") from None

    def value(vtype: int, what: str):
        if vtype == _STRING:
            return string(what)
        if vtype in _SCALAR_SIZES:
            return take(_SCALAR_SIZES[vtype], what)
        if vtype == _ARRAY:
            itype = u32(f"{what}: array item type")
            count = u64(f"{what}: array length")
            smallest = 8 if itype == _STRING else _SCALAR_SIZES.get(itype, 1 if itype == _ARRAY else 0)
            if itype != _ARRAY and itype not in _SCALAR_SIZES and itype != _STRING:
                raise _Bad(f"{what}: unknown array item type {itype} at byte {pos - 12}")
            if count * smallest > len(head) - pos:
                raise _Bad(f"{what}: array of {count} items at byte {pos - 8} cannot fit in the "
                           f"{size - pos} bytes left in the file")
            for i in range(count):
                value(itype, f"{what}[{i}]")
            return None
        raise _Bad(f"{what}: unknown value type {vtype} at byte {pos - 4}")

    try:
        if take(4, "magic") != b"GGUF":
            return None  # not a GGUF file at all: the reader's own message says so
        version = u32("version")
        if version not in (2, 3):
            return f"unsupported GGUF version {version}"
        n_tensors = u64("tensor count")
        n_kv = u64("metadata count")
        alignment = 32
        for i in range(n_kv):
            key = string(f"metadata field #{i} key")
            vtype = u32(f"metadata field {key!r}: type")
            start = pos
            value(vtype, f"metadata field {key!r}")
            if key == "general.alignment" and vtype == 4:
                alignment = struct.unpack("<I", head[start : start + 4])[0] or 32
        infos = []
        for i in range(n_tensors):
            name = string(f"tensor info #{i} name")
            n_dims = u32(f"tensor {name!r}: dimension count")
            if not 1 <= n_dims <= _MAX_DIMS:
                return f"tensor {name!r}: {n_dims} dimensions (GGUF allows 1 to {_MAX_DIMS})"
            dims = [u64(f"tensor {name!r}: dimension {d}") for d in range(n_dims)]
            ttype = u32(f"tensor {name!r}: type")
            offset = u64(f"tensor {name!r}: data offset")
            try:
                block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(ttype)]
            except (ValueError, KeyError):
                return f"tensor {name!r}: unknown tensor type {ttype}"
            elements = 1
            for d in dims:
                elements *= d
            if elements % block:
                return f"tensor {name!r}: shape {dims} is not a whole number of {block}-element blocks"
            infos.append((name, dims, offset, elements // block * type_size))
        data_start = (pos + alignment - 1) // alignment * alignment
        for name, dims, offset, n_bytes in infos:
            if data_start + offset + n_bytes > size:
                return (f"tensor {name!r} (shape {dims}): data at bytes {data_start + offset}.."
                        f"{data_start + offset + n_bytes} runs past the end of the file ({size} bytes): "
                        f"the file is truncated or its tensor table is corrupt")
    except _Bad as e:
        return str(e)
    return None


class _Bad(Exception):
    pass


def _open(path: Path):
    import gguf

    if not path.is_file():
        raise GGUFImportError(f"{path}: GGUF file not found")
    try:
        return gguf.GGUFReader(str(path))
    except Exception as e:  # the reader raises ValueError/struct errors for bad files
        try:
            detail = _diagnose(path)
        except Exception:  # the diagnosis is best effort; the reader's error stands
            detail = None
        raise GGUFImportError(f"{path}: {detail or f'not a readable GGUF file ({e})'}") from None


def _f32(x: float) -> float:
    """GGUF stores these as float32: take the shortest decimal that rounds to it (1e-05, not 9.9999997e-06)."""
    return float(repr(np.float32(x)).removeprefix("np.float32(").rstrip(")"))


def gguf_config(reader, path: Path) -> LlamaConfig:
    """``LlamaConfig`` from a GGUF's ``llama.*`` metadata (error for another architecture)."""
    p = str(path)
    arch = _field(reader, "general.architecture", required=True, path=p)
    if arch != "llama":
        raise GGUFImportError(f"{p}: GGUF architecture {arch!r} is not supported (only 'llama')")
    if _field(reader, "llama.expert_count", 0):
        raise GGUFImportError(f"{p}: mixture-of-experts llama models are not supported")
    heads = int(_field(reader, "llama.attention.head_count", required=True, path=p))
    hidden = int(_field(reader, "llama.embedding_length", required=True, path=p))
    rot = _field(reader, "llama.rope.dimension_count")
    if rot is not None and int(rot) != hidden // heads:
        raise GGUFImportError(f"{p}: rotary dimension {rot} differs from the head dimension {hidden // heads}")
    scaling = _field(reader, "llama.rope.scaling.type")
    if scaling not in (None, "none"):
        raise GGUFImportError(f"{p}: rotary scaling {scaling!r} is not supported")
    tokens = _field(reader, "tokenizer.ggml.tokens")
    vocab = _field(reader, "llama.vocab_size") or (len(tokens) if tokens else None)
    if vocab is None:
        raise GGUFImportError(f"{p}: neither llama.vocab_size nor tokenizer.ggml.tokens is present")
    names = {t.name for t in reader.tensors}
    return LlamaConfig(
        name=str(_field(reader, "general.name", path.stem)),
        num_layers=int(_field(reader, "llama.block_count", required=True, path=p)),
        hidden_size=hidden,
        ffn_hidden_size=int(_field(reader, "llama.feed_forward_length", required=True, path=p)),
        num_attention_heads=heads,
        num_query_groups=int(_field(reader, "llama.attention.head_count_kv", heads)),
        vocab_size=int(vocab),
        max_position_embeddings=int(_field(reader, "llama.context_length", 2048)),
        rotary_base=_f32(_field(reader, "llama.rope.freq_base", 10000.0)),
        norm_epsilon=_f32(_field(reader, "llama.attention.layer_norm_rms_epsilon", 1e-5)),
        tie_word_embeddings="output.weight" not in names,
    )


def gguf_state_dict(reader, cfg: LlamaConfig, path: Path) -> dict[str, torch.Tensor]:
    """Dequantized weights under Hugging Face names, Q/K rows back in rotate-half order."""
    from gguf.quants import dequantize

    out: dict[str, torch.Tensor] = {}
    for t in reader.tensors:
        stem, _, suffix = t.name.rpartition(".")
        parts = stem.split(".")
        if parts[0] == "blk" and len(parts) == 3 and parts[2] in _LAYER_TENSORS:
            name = f"model.layers.{int(parts[1])}.{_LAYER_TENSORS[parts[2]]}.{suffix}"
        elif stem in _GLOBAL_TENSORS:
            name = f"{_GLOBAL_TENSORS[stem]}.{suffix}"
        elif stem == "rope_freqs":
            raise GGUFImportError(f"{path}: tensor 'rope_freqs' (scaled rotary, e.g. LLaMA-3.1) is not supported")
        else:
            raise GGUFImportError(f"{path}: unexpected tensor {t.name!r} for a llama model")
        if suffix != "weight":
            raise GGUFImportError(f"{path}: unexpected tensor {t.name!r} (LLaMA has no biases)")
        try:
            arr = dequantize(t.data, t.tensor_type)
        except NotImplementedError:
            raise GGUFImportError(f"{path}: tensor {t.name!r}: quantization {t.tensor_type.name} "
                                  "cannot be dequantized by the installed gguf package") from None
        except (ValueError, IndexError, TypeError) as e:
            raise GGUFImportError(f"{path}: tensor {t.name!r} ({t.tensor_type.name}, shape "
                                  f"{list(int(x) for x in t.shape)}): corrupt data ({e})") from None
        shape = tuple(int(x) for x in reversed(t.shape))
        try:
            w = torch.from_numpy(np.array(arr, dtype=np.float32, order="C")).reshape(shape)
        except RuntimeError as e:
            raise GGUFImportError(f"{path}: tensor {t.name!r}: {e}") from None
        if not torch.isfinite(w).all():
            bad = int((~torch.isfinite(w)).sum())
            raise GGUFImportError(f"{path}: tensor {t.name!r} has {bad} non-finite values (NaN or inf): "
                                  "its data is corrupt")
        if name.endswith("q_proj.weight"):
            w = unpermute_rotary(w, cfg.num_attention_heads)
        elif name.endswith("k_proj.weight"):
            w = unpermute_rotary(w, cfg.num_query_groups)
        out[name] = w.contiguous()
    return out


def _token_strings(reader, path: Path) -> list[str]:
    tokens = _field(reader, "tokenizer.ggml.tokens")
    if not tokens:
        raise GGUFImportError(f"{path}: no embedded tokenizer (tokenizer.ggml.tokens missing)")
    return [str(t) for t in tokens]


def _pre_tokenizer(pre: str, path: Path) -> dict[str, Any]:
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    if pre in ("default", "gpt2", "gpt-2"):
        return byte_level
    if pre == "smollm":  # digits split one by one, then GPT-2's regex (as llama.cpp's "smollm")
        return {"type": "Sequence", "pretokenizers": [
            {"type": "Digits", "individual_digits": True}, byte_level]}
    if pre in ("llama-bpe", "llama3"):
        return {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": _LLAMA3_SPLIT}, "behavior": "Isolated", "invert": False},
            dict(byte_level, use_regex=False)]}
    raise GGUFImportError(f"{path}: BPE pre-tokenizer {pre!r} is not supported "
                          "(supported: default, gpt2, smollm, llama-bpe)")


def gguf_tokenizer_files(reader, path: Path, max_length: int) -> dict[str, str]:
    """``tokenizer.json``, ``tokenizer_config.json`` and ``special_tokens_map.json`` texts."""
    model = _field(reader, "tokenizer.ggml.model")
    if model != "gpt2":
        raise GGUFImportError(f"{path}: embedded tokenizer model {model!r} is not supported "
                              "(only GPT-2 style byte-level BPE, tokenizer.ggml.model == 'gpt2')")
    tokens = _token_strings(reader, path)
    types = _field(reader, "tokenizer.ggml.token_type") or [_TOKEN_NORMAL] * len(tokens)
    if len(types) != len(tokens):
        raise GGUFImportError(f"{path}: metadata field 'tokenizer.ggml.token_type' has {len(types)} entries but "
                              f"'tokenizer.ggml.tokens' has {len(tokens)}")
    merges = _field(reader, "tokenizer.ggml.merges")
    if not merges:
        raise GGUFImportError(f"{path}: BPE tokenizer without tokenizer.ggml.merges")
    pre = str(_field(reader, "tokenizer.ggml.pre", "default"))
    vocab = {tok: i for i, tok in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise GGUFImportError(f"{path}: duplicate token strings in tokenizer.ggml.tokens")
    added = [{"id": i, "content": tokens[i], "single_word": False, "lstrip": False, "rstrip": False,
              "normalized": False, "special": int(types[i]) == _TOKEN_CONTROL}
             for i in range(len(tokens)) if int(types[i]) in (_TOKEN_CONTROL, _TOKEN_USER_DEFINED)]

    def special(key: str) -> str | None:
        idx = _field(reader, f"tokenizer.ggml.{key}_token_id")
        return tokens[int(idx)] if idx is not None and 0 <= int(idx) < len(tokens) else None

    bos, eos, unk, pad = special("bos"), special("eos"), special("unknown"), special("padding")
    add_bos = bool(_field(reader, "tokenizer.ggml.add_bos_token", False))
    add_eos = bool(_field(reader, "tokenizer.ggml.add_eos_token", False))
    single: list[dict[str, Any]] = [{"Sequence": {"id": "A", "type_id": 0}}]
    specials: dict[str, Any] = {}
    if add_bos and bos is not None:
        single.insert(0, {"SpecialToken": {"id": bos, "type_id": 0}})
        specials[bos] = {"id": bos, "ids": [vocab[bos]], "tokens": [bos]}
    if add_eos and eos is not None:
        single.append({"SpecialToken": {"id": eos, "type_id": 0}})
        specials[eos] = {"id": eos, "ids": [vocab[eos]], "tokens": [eos]}
    tokenizer_json = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": None,
        "pre_tokenizer": _pre_tokenizer(pre, path),
        "post_processor": {"type": "TemplateProcessing", "single": single,
                           "pair": single + [{"Sequence": {"id": "B", "type_id": 1}}],
                           "special_tokens": specials},
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
                  "ignore_merges": False, "vocab": vocab,
                  "merges": [m.split(" ", 1) for m in merges]},
    }
    special_map = {k: v for k, v in (("bos_token", bos), ("eos_token", eos), ("unk_token", unk),
                                     ("pad_token", pad)) if v is not None}
    tok_config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": max_length,
        "add_bos_token": add_bos,
        "add_eos_token": add_eos,
        "clean_up_tokenization_spaces": False,
        **special_map,
    }
    template = _field(reader, "tokenizer.chat_template")
    if template:
        tok_config["chat_template"] = str(template)
    # Validate with the tokenizers library itself before anything is written.
    from tokenizers import Tokenizer

    text = json.dumps(tokenizer_json, ensure_ascii=False)
    try:
        Tokenizer.from_str(text)
    except Exception as e:
        raise GGUFImportError(f"{path}: rebuilt tokenizer is invalid ({e})") from None
    return {"tokenizer.json": text,
            "tokenizer_config.json": json.dumps(tok_config, indent=2, ensure_ascii=False) + "\n",
            "special_tokens_map.json": json.dumps(special_map, indent=2, ensure_ascii=False) + "\n"}


def read_gguf(path: str | os.PathLike) -> GGUFModel:
    """Read a llama-architecture GGUF: config, dequantized HF state dict, tokenizer files."""
    path = Path(path)
    reader = _open(path)
    cfg = gguf_config(reader, path)
    tok_files = gguf_tokenizer_files(reader, path, cfg.max_position_embeddings)
    sd = gguf_state_dict(reader, cfg, path)
    from megatron_ext.checkpoint import hf_tensor_shapes

    expected = hf_tensor_shapes(cfg)
    for key, shape in expected.items():
        if key not in sd:
            raise GGUFImportError(f"{path}: tensor for {key!r} is missing")
        if tuple(sd[key].shape) != shape:
            raise GGUFImportError(f"{path}: tensor {key!r} has shape {tuple(sd[key].shape)}, expected {shape}")
    meta = {k: _field(reader, k) for k in ("general.name", "general.architecture", "tokenizer.ggml.model",
                                           "tokenizer.ggml.pre", "general.file_type")}
    return GGUFModel(config=cfg, state_dict=sd, tokenizer_files=tok_files, metadata=meta)


def import_gguf(path: str | os.PathLike, out_dir: str | os.PathLike, dtype: str = "fp32",
                overwrite: bool = False) -> LlamaConfig:
    """Write the GGUF at ``path`` as a Hugging Face directory ``out_dir``; return its config."""
    model = read_gguf(path)
    save_hf_checkpoint(out_dir, model.config, model.state_dict, dtype=dtype, overwrite=overwrite,
                       extra_files=model.tokenizer_files)
    return model.config
