"""What a run is built from, resolved once at start: the checkpoint, the tokenizer, the model.

Each function reads its section of the run configuration and raises ``ArgsError``
naming the flag, before any model is built.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Optional, Sequence, Tuple

from megatron_ext.checkpoint import CheckpointInfo, find_checkpoint
from megatron_ext.data.tokenizers import build_tokenizer
from megatron_ext.models.config import LLAMA31_ROPE_SCALING_FACTOR, ConfigError, LlamaConfig, get_config
from megatron_ext.training.arguments import ARCH_FIELDS, ArgsError
from megatron_ext.training.config import CheckpointConfig, DataConfig, RunConfig
from megatron_ext.training.plugins import TrainerPlugin


def find_load_checkpoint(ck: CheckpointConfig) -> Optional[CheckpointInfo]:
    """The checkpoint ``--load`` names, or None to start from scratch."""
    if ck.load is None:
        return None
    path = Path(ck.load)
    same_as_save = ck.save is not None and path.resolve() == Path(ck.save).resolve()
    if not path.exists() and not same_as_save:
        raise ArgsError(f"--load {ck.load}: no such checkpoint directory")
    info = find_checkpoint(path)
    if info is None:
        if ck.finetune:
            raise ArgsError(f"--load {ck.load}: no checkpoint found (--finetune needs one)")
        if ck.exit_on_missing_checkpoint:
            raise ArgsError(f"--load {ck.load}: no checkpoint found (--exit-on-missing-checkpoint)")
    return info


def resolve_tokenizer(data: DataConfig, ckpt: Optional[CheckpointInfo]) -> Tuple[object, str]:
    """(tokenizer, its type): the flags', else the one that travels with the checkpoint."""
    model_path, tok_type = data.tokenizer_model, data.tokenizer_type
    if model_path is None:
        if ckpt is None or ckpt.tokenizer_dir is None:
            raise ArgsError("--tokenizer-model is required (the checkpoint given to --load carries no tokenizer)")
        model_path = ckpt.tokenizer_dir
    if tok_type is None:
        if ckpt is None or ckpt.tokenizer_type is None:
            raise ArgsError("--tokenizer-type is required (the checkpoint given to --load records none)")
        tok_type = ckpt.tokenizer_type
    try:
        tok = build_tokenizer(tok_type, model_path, legacy=data.legacy_tokenizer)
    except ValueError as e:
        raise ArgsError(f"--tokenizer-model: {e}") from None
    if tok.eod is None:
        raise ArgsError(f"--tokenizer-model {model_path}: the tokenizer has no end-of-document token")
    return tok, tok_type


def _ffn_for_swiglu(hidden: int) -> int:
    """Megatron-LM's default SwiGLU width: 2/3 of 4h, rounded down to a multiple of 64."""
    return int((4 * hidden * 2 / 3) / 64) * 64


def resolve_model_config(args, tokenizer, ckpt: Optional[CheckpointInfo], *, seq_length: int, tp: int,
                         plugins: Sequence[TrainerPlugin] = ()) -> LlamaConfig:
    """The model: ``--model`` (with flag overrides), else the checkpoint's, else Megatron's
    architecture flags (``args``: a ``ModelConfig``). Checked against the checkpoint, the
    tokenizer, the sequence length, TP and each plug-in's ``check_model``."""
    overrides = {name: getattr(args, name) for name, _ in ARCH_FIELDS if getattr(args, name) is not None}
    if args.group_query_attention and args.num_query_groups is None:
        overrides["num_query_groups"] = 1
    if args.use_rope_scaling and args.rope_scaling_factor is None:
        overrides["rope_scaling_factor"] = LLAMA31_ROPE_SCALING_FACTOR
    if args.untie_embeddings_and_output_weights:
        overrides["tie_word_embeddings"] = False
    try:
        if args.model is not None:
            cfg = get_config(args.model, **overrides)
        elif ckpt is not None:
            cfg = ckpt.config.replace(**overrides) if overrides else ckpt.config
        else:
            for name, flag in (("num_layers", "--num-layers"), ("hidden_size", "--hidden-size"),
                               ("num_attention_heads", "--num-attention-heads")):
                if name not in overrides:
                    raise ArgsError(f"{flag} is required without --model or a checkpoint to --load")
            missing = [flag for flag, ok in (("--swiglu", args.swiglu), ("--disable-bias-linear", args.disable_bias_linear),
                                             ("--normalization RMSNorm", args.normalization == "RMSNorm"),
                                             ("--position-embedding-type rope or --use-rotary-position-embeddings",
                                              args.position_embedding_type == "rope"
                                              or args.use_rotary_position_embeddings)) if not ok]
            if missing:
                raise ArgsError(f"building a model from Megatron flags: add {missing[0]} (our models are LLaMA: "
                                "SwiGLU, no biases, RMSNorm, rotary embeddings), or use --model")
            fields = dict(name="custom", vocab_size=tokenizer.vocab_size,
                          max_position_embeddings=seq_length,
                          num_query_groups=overrides.get("num_attention_heads"),
                          ffn_hidden_size=_ffn_for_swiglu(overrides["hidden_size"]),
                          tie_word_embeddings=not args.untie_embeddings_and_output_weights)
            fields.update(overrides)
            cfg = LlamaConfig(**fields)
    except ConfigError as e:
        raise ArgsError(f"--model: {e}") from None
    if ckpt is not None:
        # the vocabulary comes from the checkpoint (the tokenizer is checked against it below);
        # the padding multiple only shapes storage, resharding handles it
        mine, theirs = cfg.to_dict(), ckpt.config.to_dict()
        for name in mine:
            if name in ("name", "vocab_size", "make_vocab_size_divisible_by"):
                continue
            if mine[name] != theirs[name]:
                flag = next((f for n, f in ARCH_FIELDS if n == name), "--model")
                raise ArgsError(f"{flag}: {name} {mine[name]!r} differs from the checkpoint's {theirs[name]!r} "
                                f"({ckpt.iter_dir})")
        cfg = ckpt.config
    elif cfg.vocab_size != tokenizer.vocab_size:
        cfg = cfg.replace(vocab_size=tokenizer.vocab_size)
    if tokenizer.vocab_size > cfg.vocab_size:
        raise ArgsError(f"--tokenizer-model: the tokenizer has {tokenizer.vocab_size} tokens, more than the model's "
                        f"vocabulary of {cfg.vocab_size}")
    if args.kv_channels is not None and args.kv_channels != cfg.head_dim:
        raise ArgsError(f"--kv-channels {args.kv_channels}: must equal hidden size / heads = {cfg.head_dim}")
    if seq_length > cfg.max_position_embeddings:
        raise ArgsError(f"--seq-length {seq_length} exceeds the model's max position embeddings "
                        f"{cfg.max_position_embeddings} (--max-position-embeddings)")
    try:
        cfg.validate_tp(tp)
    except ConfigError as e:
        raise ArgsError(f"--tensor-model-parallel-size: {e}") from None
    for plugin in plugins:
        plugin.check_model(cfg, tp)
    return cfg


def probe_output_dirs(config: RunConfig) -> None:
    """Every place the run will write (checkpoints, logs, TensorBoard, the index cache) is a
    writable directory, or can be made one: checked at start, not after an interval of compute."""
    lg = config.logging
    places = (("--save", config.checkpoint.save), ("--log-dir", os.path.join(lg.log_dir, lg.tag)),
              ("--tensorboard-dir", lg.tensorboard_dir), ("--data-cache-path", config.data.data_cache_path))
    for flag, place in places:
        if place is None:
            continue
        path = Path(place)
        if path.exists() and not path.is_dir():
            raise ArgsError(f"{flag} {place}: exists and is not a directory")
        try:
            path.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=path, prefix=".write-probe-"):
                pass
        except OSError as e:
            raise ArgsError(f"{flag} {place}: not writable ({e.strerror or e})") from None
