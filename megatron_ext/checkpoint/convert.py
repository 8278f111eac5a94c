"""Conversion between Hugging Face directories, GGUF files and our checkpoints."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

from megatron_ext.checkpoint.files import tokenizer_files
from megatron_ext.checkpoint.hf import hf_to_mcore, mcore_to_hf, read_hf_checkpoint, save_hf_checkpoint
from megatron_ext.checkpoint.io import load_checkpoint, save_checkpoint
from megatron_ext.checkpoint.layout import CheckpointError
from megatron_ext.checkpoint.resharding import reshard

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
            from megatron_ext.checkpoint.gguf import read_gguf

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
