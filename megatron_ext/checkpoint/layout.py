"""The on-disk layout of our checkpoints, and every name in it, defined once.

A checkpoint is laid out as Megatron users expect::

    <dir>/latest_checkpointed_iteration.txt            tracker, written last
    <dir>/iter_0000800/checkpoint.json                 config, TP size, dtype, tokenizer, extras
    <dir>/iter_0000800/tokenizer/...                   the tokenizer files
    <dir>/iter_0000800/mp_rank_00/model_optim_rng.pt   one file per TP rank

Each rank file is a dict: ``model`` (the rank's state dict), Megatron's ``args``,
``config``, ``iteration``, ``checkpoint_version``, ``tensor_model_parallel_rank``
and, for a training checkpoint, ``optimizer``, ``opt_param_scheduler``,
``rng_state`` and ``train_state`` (``megatron_ext.checkpoint.train_state``).
Tensor keys of masked linears: ``<module>.mask_logits`` (fp32 logits over the N:M
candidates, learned) and ``<module>.hard_mask`` (a fixed bool mask, one-shot priors).
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from megatron_ext.errors import MegatronExtError
from megatron_ext.models.config import LLAMA31_ROPE_SCALING_FACTOR, LlamaConfig

MODEL_FILE = "model_optim_rng.pt"
TRACKER_FILE = "latest_checkpointed_iteration.txt"
INFO_FILE = "checkpoint.json"
TOKENIZER_DIR = "tokenizer"
FORMAT_NAME = "megatron_ext"
FORMAT_VERSION = 1
CHECKPOINT_VERSION = 3.0  # Megatron-LM's current value for the same field
ITER_DIR = re.compile(r"^iter_(\d{7})$")
_INFO_FIELDS = ("format", "format_version", "iteration", "tensor_model_parallel_size",
                "pipeline_model_parallel_size", "dtype", "padded_vocab_size", "config", "tokenizer")

# Tensors a masked linear adds beside its weight (attribute names of the sparsity layer).
MASK_LOGITS = "mask_logits"
HARD_MASK = "hard_mask"
LOGITS_SUFFIX = "." + MASK_LOGITS
HARD_MASK_SUFFIX = "." + HARD_MASK
MASK_SUFFIXES = (LOGITS_SUFFIX, HARD_MASK_SUFFIX)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


class CheckpointError(MegatronExtError, ValueError):
    """A checkpoint that cannot be read, written or converted; the message names the file or tensor."""

    exit_code = 1


def is_extra_state(key: str) -> bool:
    """megatron-core's ``_extra_state`` entries (TransformerEngine metadata): never saved."""
    return key.endswith("_extra_state")


def has_masks(sd) -> bool:
    return any(k.endswith(MASK_SUFFIXES) for k in sd)


def strip_masks(sd) -> dict:
    """The dense weights alone (what a dense evaluation of a sparse checkpoint uses)."""
    return {k: v for k, v in sd.items() if not k.endswith(MASK_SUFFIXES)}


def parse_dtype(name: str | torch.dtype | None) -> torch.dtype | None:
    """``'fp32' | 'bf16' | 'fp16'`` (or a torch dtype, or None) -> torch dtype."""
    if name is None or isinstance(name, torch.dtype):
        if name is not None and name not in _DTYPE_NAMES:
            raise CheckpointError(f"unsupported dtype {name}; use one of {', '.join(DTYPES)}")
        return name
    try:
        return DTYPES[name]
    except KeyError:
        raise CheckpointError(f"unknown dtype {name!r}; use one of {', '.join(DTYPES)}") from None


def dtype_name(dtype: torch.dtype) -> str:
    """torch dtype -> ``'fp32' | 'bf16' | 'fp16'``."""
    try:
        return _DTYPE_NAMES[dtype]
    except KeyError:
        raise CheckpointError(f"unsupported dtype {dtype}; use one of {', '.join(DTYPES)}") from None



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
        "use_rope_scaling": cfg.rope_scaling_factor is not None, "rope_scaling_factor": cfg.rope_scaling_factor or LLAMA31_ROPE_SCALING_FACTOR,
        "normalization": "RMSNorm", "norm_epsilon": cfg.norm_epsilon, "swiglu": True,
        "add_bias_linear": False, "untie_embeddings_and_output_weights": not cfg.tie_word_embeddings,
        "vocab_size": cfg.vocab_size, "padded_vocab_size": cfg.padded_vocab_size(tp),
        "make_vocab_size_divisible_by": cfg.make_vocab_size_divisible_by,
        "tensor_model_parallel_size": tp, "pipeline_model_parallel_size": 1,
        "params_dtype": str(dtype).replace("torch.", ""), "bf16": dtype == torch.bfloat16, "fp16": dtype == torch.float16,
    }



def list_iterations(save_dir: str | os.PathLike) -> list[int]:
    """The iterations saved in ``save_dir`` (complete iteration directories), ascending."""
    save_dir = Path(save_dir)
    if not save_dir.is_dir():
        return []
    return sorted(int(m.group(1)) for p in save_dir.iterdir() if p.is_dir() and (m := ITER_DIR.match(p.name)))


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



def find_checkpoint(load: str | os.PathLike) -> CheckpointInfo | None:
    """The checkpoint ``--load`` names (the tracker's iteration, or an iteration directory),
    or None when the directory holds none yet. Raises ``CheckpointError`` for a broken one."""
    path = Path(load)
    if not path.exists():
        return None
    if not (path / TRACKER_FILE).is_file() and not (path / INFO_FILE).is_file():
        if path.is_dir() and not list_iterations(path):
            return None
    return read_checkpoint_info(path)
