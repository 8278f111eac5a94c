"""The one checkpoint writer and the one reader, shared by the tools and the trainer.

Writing is three steps, so that a single process (the tools) and a collective save
(the trainer: every TP rank writes its own file) share them:

1. ``begin_save``: check ``--save``, remove a crashed save's leftovers, make the
   temporary directory ``.iter_XXXXXXX.tmp``;
2. ``write_shard``: one TP rank's file (``shard_payload`` plus any training state);
3. ``commit_save``: ``checkpoint.json`` and the tokenizer, rename into place, then the
   tracker, then checkpoints beyond ``keep_last`` are removed.

A crash at any point leaves the checkpoint the tracker names intact. Reading goes
through ``read_shard`` (``torch.load(weights_only=True)``, memory-mapped), with
resharding on the fly when the saved TP differs from the one asked for.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from megatron_ext.checkpoint.files import (copy_tokenizer, fsync_dir, owned, publish_permissions, save_torch_file,
                                           tokenizer_files)
from megatron_ext.checkpoint.layout import (_INFO_FIELDS, CHECKPOINT_VERSION, FORMAT_NAME, FORMAT_VERSION, INFO_FILE,
                                            LOGITS_SUFFIX, MODEL_FILE, TOKENIZER_DIR, TRACKER_FILE, CheckpointError,
                                            CheckpointInfo, dtype_name, infer_tokenizer_type, is_extra_state,
                                            iteration_dir_name, list_iterations, megatron_args, parse_dtype,
                                            read_checkpoint_info, shard_path)
from megatron_ext.checkpoint.resharding import _validate_rank, reshard, validate_rank_state_dicts
from megatron_ext.files import atomic_write_text
from megatron_ext.models.config import LlamaConfig

# --------------------------------------------------------------------------- model <-> state dict


def model_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """This rank's tensors of a ``GPTModel`` on the CPU, without ``_extra_state`` entries."""
    return {k: owned(v.to("cpu")) for k, v in model.state_dict().items()
            if not is_extra_state(k) and isinstance(v, torch.Tensor)}


def load_into_model(model: torch.nn.Module, state_dict: Mapping[str, torch.Tensor]) -> None:
    """Copy one rank's state dict into ``model`` (strict; ``_extra_state`` ignored)."""
    own = {k: v for k, v in model.state_dict().items() if not is_extra_state(k)}
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(k for k in state_dict if k not in own and not is_extra_state(k))
    if missing:
        raise CheckpointError(f"state dict lacks model tensor {missing[0]!r} ({len(missing)} missing)")
    if unexpected:
        raise CheckpointError(f"state dict has tensor {unexpected[0]!r} the model does not ({len(unexpected)} extra)")
    for k, v in own.items():
        if tuple(v.shape) != tuple(state_dict[k].shape):
            raise CheckpointError(f"tensor {k!r}: model expects shape {tuple(v.shape)}, state dict has "
                                  f"{tuple(state_dict[k].shape)}")
    model.load_state_dict({k: state_dict[k] for k in own}, strict=False)


def floating_dtype(sd: Mapping[str, torch.Tensor]) -> torch.dtype:
    """The dtype of the weights (mask logits, fp32 whatever the weights are, do not count)."""
    for k, t in sd.items():
        if isinstance(t, torch.Tensor) and t.is_floating_point() and not k.endswith(LOGITS_SUFFIX):
            return t.dtype
    return torch.float32


# --------------------------------------------------------------------------- writing


def shard_payload(model_sd: Mapping[str, torch.Tensor], cfg: LlamaConfig, *, tp: int, rank: int, iteration: int,
                  dtype: torch.dtype, run_args: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The fields every rank file carries, under Megatron-LM's names."""
    return {
        "model": dict(model_sd),
        "args": {**megatron_args(cfg, tp, dtype), **dict(run_args or {}), "iteration": iteration},
        "config": cfg.to_dict(),
        "iteration": iteration,
        "checkpoint_version": CHECKPOINT_VERSION,
        "tensor_model_parallel_rank": rank,
    }


def temporary_dir(final: Path) -> Path:
    return final.parent / f".{final.name}.tmp"


def begin_save(save_dir: str | os.PathLike, iteration: int, *, overwrite: bool = True) -> Path:
    """Check ``save_dir`` and create the empty temporary directory of ``iteration``.
    Leftovers of crashed saves are removed first. Returns the temporary directory."""
    if not isinstance(iteration, int) or iteration < 0:
        raise CheckpointError(f"iteration must be a non-negative integer, got {iteration!r}")
    save_dir = Path(save_dir)
    if save_dir.exists() and not save_dir.is_dir():
        raise CheckpointError(f"--save {save_dir}: exists and is not a directory")
    final = save_dir / iteration_dir_name(iteration)
    try:
        save_dir.mkdir(parents=True, exist_ok=True)
        if final.exists() and not overwrite:
            raise CheckpointError(f"{final}: iteration already saved (pass overwrite to replace it)")
        for stale in save_dir.glob(".iter_*.tmp"):
            shutil.rmtree(stale, ignore_errors=True)
        tmp = temporary_dir(final)
        tmp.mkdir()
    except OSError as e:
        raise CheckpointError(f"--save {save_dir}: cannot write a checkpoint ({e.strerror})") from None
    return tmp


def write_shard(tmp: Path, rank: int, payload: Mapping[str, Any]) -> Path:
    """One TP rank's file inside the temporary directory."""
    path = shard_path(tmp, rank)
    save_torch_file(path, dict(payload))
    return path


def copy_tokenizer_source(source: str | os.PathLike, dst: Path) -> list[str]:
    """A tokenizer into ``dst`` under the names our loaders look for: a directory's
    tokenizer files; a ``tokenizer.json`` file with its siblings; a SentencePiece model
    file (any name) as ``tokenizer.model``."""
    src = Path(source)
    if src.is_dir():
        return sorted(copy_tokenizer(src, dst))
    if src.name.endswith(".json"):
        names = copy_tokenizer(src.parent, dst)
        if "tokenizer.json" not in names:
            shutil.copyfile(src, dst / "tokenizer.json")
            names.append("tokenizer.json")
        return sorted(names)
    shutil.copyfile(src, dst / "tokenizer.model")
    return ["tokenizer.model"]


def commit_save(tmp: Path, cfg: LlamaConfig, *, iteration: int, tp: int, dtype: torch.dtype,
                tokenizer_source: str | os.PathLike | None = None, tokenizer_type: str | None = None,
                extra_info: Mapping[str, Any] | None = None, keep_last: int | None = None) -> Path:
    """Finish the complete temporary directory ``tmp``: tokenizer, ``checkpoint.json``, rename
    into place (replacing an older copy of the same iteration only once the new one is in
    place), tracker, ``keep_last``. Returns the iteration directory. On failure ``tmp`` is removed."""
    save_dir = tmp.parent
    final = save_dir / iteration_dir_name(iteration)
    try:
        tok_names: list[str] = []
        if tokenizer_source is not None:
            (tmp / TOKENIZER_DIR).mkdir()
            tok_names = copy_tokenizer_source(tokenizer_source, tmp / TOKENIZER_DIR)
            tokenizer_type = tokenizer_type or infer_tokenizer_type(tmp / TOKENIZER_DIR)
        info = {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "iteration": iteration,
            "tensor_model_parallel_size": tp,
            "pipeline_model_parallel_size": 1,
            "dtype": dtype_name(dtype),
            "padded_vocab_size": cfg.padded_vocab_size(tp),
            "config": cfg.to_dict(),
            "tokenizer": ({"type": tokenizer_type, "dir": TOKENIZER_DIR, "files": tok_names}
                          if tokenizer_source is not None else None),
        }
        info.update(extra_info or {})
        (tmp / INFO_FILE).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
        publish_permissions(tmp)
        if final.exists():
            trash = Path(tempfile.mkdtemp(prefix=f".{final.name}.old-", dir=save_dir))
            os.rename(final, trash / "d")
            os.rename(tmp, final)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.rename(tmp, final)
        fsync_dir(save_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    atomic_write_text(save_dir / TRACKER_FILE, f"{iteration}\n", durable=True)
    if keep_last is not None:
        for old in list_iterations(save_dir)[:-keep_last]:
            if old != iteration:
                shutil.rmtree(save_dir / iteration_dir_name(old), ignore_errors=True)
    return final


def save_checkpoint(save_dir: str | os.PathLike, rank_state_dicts: Sequence[Mapping[str, torch.Tensor]],
                    cfg: LlamaConfig, *, iteration: int = 0, dtype: str | torch.dtype | None = None,
                    tokenizer_dir: str | os.PathLike | None = None, tokenizer_type: str | None = None,
                    extra_info: Mapping[str, Any] | None = None, overwrite: bool = False) -> Path:
    """Write ``rank_state_dicts`` (one per TP rank) as iteration ``iteration`` of ``save_dir``
    from one process (the tools). ``dtype`` casts floating tensors (mask logits stay fp32);
    ``tokenizer_dir``'s tokenizer files travel with the checkpoint; ``extra_info`` is
    merged into checkpoint.json. Returns the iteration directory."""
    clash = sorted(set(extra_info or {}) & set(_INFO_FIELDS))
    if clash:
        raise CheckpointError(f"extra_info may not replace checkpoint.json field {clash[0]!r}")
    validate_rank_state_dicts(rank_state_dicts, cfg)
    if tokenizer_dir is not None and not tokenizer_files(tokenizer_dir):
        raise CheckpointError(f"{tokenizer_dir}: no tokenizer files found")
    tp = len(rank_state_dicts)
    target = parse_dtype(dtype)
    tmp = begin_save(save_dir, iteration, overwrite=overwrite)
    try:
        out_dtype = None
        for rank, sd in enumerate(rank_state_dicts):
            model = {k: owned((v.to(target) if target is not None and v.is_floating_point()
                               and not k.endswith(LOGITS_SUFFIX) else v).cpu())
                     for k, v in sd.items() if not is_extra_state(k)}
            out_dtype = out_dtype or floating_dtype(model)
            write_shard(tmp, rank, shard_payload(model, cfg, tp=tp, rank=rank, iteration=iteration, dtype=out_dtype))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return commit_save(tmp, cfg, iteration=iteration, tp=tp, dtype=out_dtype, tokenizer_source=tokenizer_dir,
                       tokenizer_type=tokenizer_type, extra_info=extra_info)


# --------------------------------------------------------------------------- reading


def read_shard(info: CheckpointInfo, rank: int) -> dict[str, Any]:
    """The whole file of TP rank ``rank`` (model, and the training state when saved)."""
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
    return payload


def _shard_dirs(it_dir: Path) -> list[str]:
    return sorted(p.name for p in it_dir.iterdir() if p.is_dir() and p.name.startswith("mp_rank_"))


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
    sds = [read_shard(info, r)["model"] for r in range(tp)]
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
        sd = read_shard(info, rank)["model"]
        _validate_rank(sd, info.config, tp, str(info.shard_path(rank)))
        return info, sd
    info, sds = load_checkpoint(path, iteration)
    return info, reshard(sds, info.config, tp)[rank]


@dataclass
class LoadedModel:
    """One TP rank's weights from a Hugging Face directory or one of our checkpoints."""
    config: LlamaConfig
    state_dict: dict[str, torch.Tensor]
    tokenizer_type: str | None
    tokenizer_dir: Path | None
    source: str  # "hf" or "megatron"


def load_for_rank(load: str | os.PathLike, tp: int, rank: int, tokenizer_type: str | None = None) -> LoadedModel:
    """This TP rank's state dict from a Hugging Face directory or one of our checkpoints
    (resharded in memory when it was saved at another TP)."""
    from megatron_ext.checkpoint.hf import CONFIG_NAME, hf_to_mcore, read_hf_checkpoint

    path = Path(load)
    if not path.exists():
        raise CheckpointError(f"{path}: checkpoint not found")
    if (path / CONFIG_NAME).is_file():
        cfg, hf_sd = read_hf_checkpoint(path)
        sd = hf_to_mcore(hf_sd, cfg, tp)[rank]
        tok_dir = path if infer_tokenizer_type(path) else None
        return LoadedModel(cfg, sd, tokenizer_type or infer_tokenizer_type(path), tok_dir, "hf")
    info, sd = load_rank_state_dict(path, tp, rank)
    return LoadedModel(info.config, sd, tokenizer_type or info.tokenizer_type, info.tokenizer_dir, "megatron")


def build_tokenizer_for(loaded: LoadedModel, where: str):
    """The tokenizer that came with a loaded checkpoint."""
    from megatron_ext.data.tokenizers import build_tokenizer

    if loaded.tokenizer_dir is None or loaded.tokenizer_type is None:
        raise CheckpointError(f"{where}: no tokenizer comes with this checkpoint (tokenizer files missing)")
    return build_tokenizer(loaded.tokenizer_type, str(loaded.tokenizer_dir))
