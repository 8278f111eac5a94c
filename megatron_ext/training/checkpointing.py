"""Training checkpoints: our checkpoint format plus what a run needs to continue exactly.

The layout is ``megatron_ext.models.checkpoint``'s (``iter_XXXXXXX/mp_rank_XX/
model_optim_rng.pt``, ``checkpoint.json``, the tokenizer, the tracker file), so
every tool reads a training checkpoint. Each TP rank's file adds, beside ``model``
(weights and mask logits):

``optimizer``           AdamW state and fp32 main copies (not with ``--no-save-optim``)
``opt_param_scheduler`` the learning-rate schedule and its step (Megatron's keys)
``rng_state``           ``[{python, numpy, torch, device, tracker states}]`` (not with ``--no-save-rng``)
``train_state``         iteration, consumed train / valid samples, sparsity step

Saving is collective: every rank calls ``save_training_checkpoint``. The first
data-parallel replica of each TP rank writes its file into a temporary directory;
when every file is complete, rank 0 writes ``checkpoint.json`` and the tokenizer,
renames the directory into place and only then updates the tracker and removes
checkpoints beyond ``--keep-last``. A crash at any point leaves the previous
checkpoint the tracker names intact; a leftover temporary directory is removed by
the next save.
"""
from __future__ import annotations

import os
import random
import re
import shutil
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional

import numpy as np
import torch
import torch.distributed as dist

from megatron_ext import platform
from megatron_ext.models.checkpoint import (
    CHECKPOINT_VERSION,
    INFO_FILE,
    TOKENIZER_DIR,
    TRACKER_FILE,
    CheckpointError,
    CheckpointInfo,
    finish_iteration_dir,
    iteration_dir_name,
    load_rank_state_dict,
    megatron_args,
    model_state_dict,
    read_checkpoint_info,
    shard_path,
)
from megatron_ext.models.config import LlamaConfig
from megatron_ext.models.hf import atomic_write_text

ITER_DIR = re.compile(r"^iter_(\d{7})$")
HARD_MASK_SUFFIX = ".hard_mask"
LOGITS_SUFFIX = ".mask_logits"


# --------------------------------------------------------------------------- random state


def rng_state() -> Dict[str, Any]:
    """Every random state a step may draw from (python, numpy, torch, device, megatron's tracker)."""
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    version, keys, gauss = random.getstate()
    np_kind, np_keys, np_pos, np_has_gauss, np_cached = np.random.get_state()
    return {
        "random_rng_state": (version, tuple(keys), gauss),
        "np_rng_state": {"kind": np_kind, "keys": torch.from_numpy(np_keys.astype(np.int64)), "pos": int(np_pos),
                         "has_gauss": int(np_has_gauss), "cached_gaussian": float(np_cached)},
        "torch_rng_state": torch.get_rng_state(),
        "device_rng_state": _device_rng_state(),
        "rng_tracker_states": {k: _cpu_state(v) for k, v in get_cuda_rng_tracker().get_states().items()},
    }


def set_rng_state(state: Mapping[str, Any], where: str = "checkpoint") -> None:
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    try:
        version, keys, gauss = state["random_rng_state"]
        random.setstate((version, tuple(keys), gauss))
        s = state["np_rng_state"]
        np.random.set_state((s["kind"], s["keys"].numpy().astype(np.uint32), s["pos"], s["has_gauss"],
                             s["cached_gaussian"]))
        torch.set_rng_state(state["torch_rng_state"])
        _set_device_rng_state(state.get("device_rng_state"))
        get_cuda_rng_tracker().set_states({k: v.clone() for k, v in state["rng_tracker_states"].items()})
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{where}: unreadable random state ({e}); pass --no-load-rng to skip it") from None


def _cpu_state(state):
    return state.detach().cpu().clone() if isinstance(state, torch.Tensor) else state


_device_rng_state = platform.device_rng_state
_set_device_rng_state = platform.set_device_rng_state


# --------------------------------------------------------------------------- collectives


def _world() -> tuple[int, int]:
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _all_ok(ok: bool) -> bool:
    """True on every rank when ``ok`` is True on every rank."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return ok
    flag = torch.tensor([1 if ok else 0], dtype=torch.int32, device=platform.device())
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# --------------------------------------------------------------------------- saving


def _copy_tokenizer(tokenizer, dst: Path) -> List[str]:
    """The run's tokenizer files into ``dst`` under the names our loaders look for."""
    src = Path(tokenizer.path)
    names = []
    if src.name.endswith(".json"):
        from megatron_ext.models.hf import tokenizer_files

        for f in tokenizer_files(src.parent):
            shutil.copyfile(f, dst / f.name)
            names.append(f.name)
        if "tokenizer.json" not in names:
            shutil.copyfile(src, dst / "tokenizer.json")
            names.append("tokenizer.json")
    else:
        shutil.copyfile(src, dst / "tokenizer.model")
        names.append("tokenizer.model")
    return sorted(names)


def list_iterations(save_dir: Path) -> List[int]:
    if not save_dir.is_dir():
        return []
    return sorted(int(m.group(1)) for p in save_dir.iterdir() if p.is_dir() and (m := ITER_DIR.match(p.name)))


def save_training_checkpoint(save_dir: str | os.PathLike, iteration: int, cfg: LlamaConfig, model: torch.nn.Module, *,
                             tp_rank: int, tp_size: int, dp_rank: int, scheduler, optimizer=None,
                             save_rng: bool = True, train_state: Mapping[str, Any],
                             run_args: Mapping[str, Any], info_extra: Mapping[str, Any],
                             tokenizer=None, tokenizer_type: Optional[str] = None,
                             keep_last: Optional[int] = None) -> Path:
    """Collective: save iteration ``iteration`` (see the module docstring). Returns its directory."""
    save_dir = Path(save_dir)
    rank, _ = _world()
    final = save_dir / iteration_dir_name(iteration)
    tmp = save_dir / f".{final.name}.tmp"
    error: Optional[BaseException] = None

    if rank == 0:
        try:
            if save_dir.exists() and not save_dir.is_dir():
                raise CheckpointError(f"--save {save_dir}: exists and is not a directory")
            save_dir.mkdir(parents=True, exist_ok=True)
            for stale in save_dir.glob(".iter_*.tmp"):
                shutil.rmtree(stale, ignore_errors=True)
            tmp.mkdir()
        except OSError as e:
            error = CheckpointError(f"--save {save_dir}: cannot write a checkpoint ({e.strerror})")
        except CheckpointError as e:
            error = e
    if not _all_ok(error is None):
        raise error or CheckpointError(f"--save {save_dir}: rank 0 could not prepare the checkpoint directory")

    dtype = next((p.dtype for n, p in model.named_parameters() if not n.endswith(LOGITS_SUFFIX)), torch.float32)
    if dp_rank == 0:  # one replica of each TP rank writes
        try:
            sd = model_state_dict(model)
            payload = {
                "model": sd,
                "args": {**megatron_args(cfg, tp_size, dtype), **dict(run_args), "iteration": iteration},
                "config": cfg.to_dict(),
                "iteration": iteration,
                "checkpoint_version": CHECKPOINT_VERSION,
                "tensor_model_parallel_rank": tp_rank,
                "opt_param_scheduler": scheduler.state_dict(),
                "train_state": dict(train_state),
            }
            if optimizer is not None:
                payload["optimizer"] = optimizer.state_dict()
            if save_rng:
                payload["rng_state"] = [rng_state()]
            path = shard_path(tmp, tp_rank)
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "wb") as f:
                torch.save(payload, f)
                f.flush()
                os.fsync(f.fileno())
            del payload, sd
        except Exception as e:  # reported on every rank below
            error = e
    if not _all_ok(error is None):
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        if error is not None:
            raise CheckpointError(f"{tmp}: writing TP rank {tp_rank}'s checkpoint failed ({error})") from error
        raise CheckpointError(f"{tmp}: another rank failed to write its part of iteration {iteration}")

    if rank == 0:
        try:
            tok_names = []
            if tokenizer is not None:
                (tmp / TOKENIZER_DIR).mkdir()
                tok_names = _copy_tokenizer(tokenizer, tmp / TOKENIZER_DIR)
            finish_iteration_dir(tmp, final, cfg, iteration=iteration, tp=tp_size, dtype=dtype,
                                 tokenizer_type=tokenizer_type if tokenizer is not None else None,
                                 tokenizer_files=tok_names, extra_info=info_extra)
            _fsync_dir(save_dir)
            atomic_write_text(save_dir / TRACKER_FILE, f"{iteration}\n")
            if keep_last is not None:
                for old in list_iterations(save_dir)[:-keep_last]:
                    if old != iteration:
                        shutil.rmtree(save_dir / iteration_dir_name(old), ignore_errors=True)
        except Exception as e:
            shutil.rmtree(tmp, ignore_errors=True)
            error = e
    if not _all_ok(error is None):
        if error is not None:
            raise CheckpointError(f"{final}: committing the checkpoint failed ({error})") from error
        raise CheckpointError(f"{final}: rank 0 failed to commit the checkpoint")
    return final


# --------------------------------------------------------------------------- loading


def find_checkpoint(load: str | os.PathLike) -> Optional[CheckpointInfo]:
    """The checkpoint ``--load`` names (the tracker's iteration, or an iteration directory),
    or None when the directory holds none yet. Raises ``CheckpointError`` for a broken one."""
    path = Path(load)
    if not path.exists():
        return None
    if not (path / TRACKER_FILE).is_file() and not (path / INFO_FILE).is_file():
        if path.is_dir() and not list_iterations(path):
            return None
    return read_checkpoint_info(path)


def read_rank_file(info: CheckpointInfo, tp_rank: int) -> Dict[str, Any]:
    """The whole file of TP rank ``tp_rank`` (model, optimizer, scheduler, RNG, train state)."""
    path = info.shard_path(tp_rank)
    if not path.is_file():
        raise CheckpointError(f"missing shard {path} (checkpoint has TP={info.tensor_parallel_size})")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"{path}: cannot read with torch.load(weights_only=True) ({e})") from None
    if not isinstance(payload, dict) or not isinstance(payload.get("model"), dict):
        raise CheckpointError(f"{path}: no 'model' state dict in file")
    return payload


def model_weights_for_rank(info: CheckpointInfo, tp_size: int, tp_rank: int) -> Dict[str, torch.Tensor]:
    """This TP rank's model tensors (resharded when the checkpoint was saved at another TP)."""
    _, sd = load_rank_state_dict(info.iter_dir, tp_size, tp_rank)
    return sd


def load_model_weights(model: torch.nn.Module, sd: Mapping[str, torch.Tensor], *, allow_missing_logits: bool,
                       where: str) -> Dict[str, List[str]]:
    """Copy ``sd`` into ``model``: ``*.hard_mask`` entries are skipped, and mask logits the
    checkpoint lacks keep their initial values when ``allow_missing_logits``.
    Returns ``{"skipped": [...], "fresh": [...]}`` (key names)."""
    from megatron_ext.models.checkpoint import load_into_model

    own = {k: v for k, v in model.state_dict().items() if not k.endswith("_extra_state")}
    skipped = sorted(k for k in sd if k.endswith(HARD_MASK_SUFFIX))
    wanted = {k: v for k, v in sd.items() if not k.endswith(HARD_MASK_SUFFIX) and not k.endswith("_extra_state")}
    logits_in_ckpt = [k for k in wanted if k.endswith(LOGITS_SUFFIX)]
    if logits_in_ckpt and not any(k.endswith(LOGITS_SUFFIX) for k in own):
        raise CheckpointError(f"{where}: the checkpoint has mask logits ({logits_in_ckpt[0]!r}) but this model is "
                              "dense: pass --mask-only or --N/--M to continue learning the masks, or export the "
                              "sparse weights first (tools/export_sparse.py)")
    fresh = sorted(k for k in own if k.endswith(LOGITS_SUFFIX) and k not in wanted)
    if fresh and not allow_missing_logits:
        raise CheckpointError(f"{where}: the checkpoint has no mask logits ({fresh[0]!r} missing); pass --finetune "
                              "or --enable-partial-load to start the masks from scratch")
    merged = dict(wanted)
    for k in fresh:
        merged[k] = own[k].detach()
    try:
        load_into_model(model, merged)
    except CheckpointError as e:
        raise CheckpointError(f"{where}: {e}") from None
    return {"skipped": skipped, "fresh": fresh}
