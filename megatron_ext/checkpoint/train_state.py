"""Training state in a checkpoint: what a run needs to continue exactly where it stopped.

Beside ``model`` (weights, mask logits), each TP rank's file of a training checkpoint holds:

``optimizer``           AdamW state and fp32 main copies (not with ``--no-save-optim``)
``opt_param_scheduler`` the learning-rate schedule and its step (Megatron's keys)
``rng_state``           ``[{python, numpy, torch, device, tracker states}]`` (not with ``--no-save-rng``)
``train_state``         iteration, consumed samples, and what plug-ins and stages add

and ``checkpoint.json`` has a ``training`` section (and one per plug-in). Saving is
collective: every rank calls ``save_training_checkpoint``; the first data-parallel
replica of each TP rank writes its file through the shared writer
(``megatron_ext.checkpoint.io``), and rank 0 commits.
"""
from __future__ import annotations

import os
import random
import shutil
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence

import numpy as np
import torch

from megatron_ext import platform
from megatron_ext.checkpoint.io import (begin_save, commit_save, load_into_model, model_state_dict, shard_payload,
                                        temporary_dir, write_shard)
from megatron_ext.checkpoint.layout import (HARD_MASK_SUFFIX, LOGITS_SUFFIX, CheckpointError, is_extra_state,
                                            iteration_dir_name)
from megatron_ext.models.config import LlamaConfig

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
        "device_rng_state": platform.device_rng_state(),
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
        platform.set_device_rng_state(state.get("device_rng_state"))
        get_cuda_rng_tracker().set_states({k: v.clone() for k, v in state["rng_tracker_states"].items()})
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{where}: unreadable random state ({e}); pass --no-load-rng to skip it") from None


def reshard_optimizer_state(states: Sequence[Mapping[str, Any]], cfg: LlamaConfig, tp: int, rank: int,
                            where: str) -> Dict[str, Any]:
    """TP rank ``rank`` of ``tp``'s optimizer state from the states every TP rank of a
    checkpoint saved (``TrainOptimizer.state_dict``: AdamW's moments and step per trained
    tensor, fp32 main copies): each tensor's moments are merged and split as its weight is
    (``resharding``); steps and hyper-parameters are the same on every rank."""
    from megatron_ext.checkpoint.resharding import merge_tp, split_tp

    try:
        names = list(states[0]["param_names"])
        adams = [st["adam"] for st in states]
        mains = [st["main_params"] for st in states]
        if any(list(st["param_names"]) != names for st in states):
            raise CheckpointError(f"{where}: the TP ranks' optimizer states train different tensors")

        moments = {}
        for key in ("exp_avg", "exp_avg_sq"):
            rank_sds = [{names[int(i)]: st[key] for i, st in a["state"].items()} for a in adams]
            moments[key] = split_tp(merge_tp(rank_sds, cfg, complete=False), cfg, tp)[rank]
        main_sds = [{names[int(i)]: t for i, t in m.items()} for m in mains]
        main = split_tp(merge_tp(main_sds, cfg, complete=False), cfg, tp)[rank] if main_sds[0] else {}
        state = {}
        for i, st in adams[0]["state"].items():
            name = names[int(i)]
            state[i] = {**{k: v for k, v in st.items() if k not in moments},
                        **{k: moments[k][name].clone() for k in moments}}
        index = {n: i for i, n in enumerate(names)}
        return {"param_names": names, "adam": {"state": state, "param_groups": adams[0]["param_groups"]},
                "main_params": {index[n]: t.clone() for n, t in main.items()}}
    except (KeyError, TypeError, IndexError, ValueError) as e:
        raise CheckpointError(f"{where}: unreadable optimizer state for resharding ({e})") from None


def _cpu_state(state):
    return state.detach().cpu().clone() if isinstance(state, torch.Tensor) else state


def save_training_checkpoint(save_dir: str | os.PathLike, iteration: int, cfg: LlamaConfig, model: torch.nn.Module, *,
                             scheduler, optimizer=None, save_rng: bool = True, train_state: Mapping[str, Any],
                             run_args: Mapping[str, Any], info_extra: Mapping[str, Any],
                             tokenizer_source=None, tokenizer_type: Optional[str] = None,
                             keep_last: Optional[int] = None) -> Path:
    """Collective: save iteration ``iteration``. Returns its directory on every rank."""
    save_dir = Path(save_dir)
    tp_size, tp_rank = platform.tp_size(), platform.tp_rank()
    final = save_dir / iteration_dir_name(iteration)
    tmp = temporary_dir(final)  # the name every rank writes into; rank 0 creates it
    error: Optional[BaseException] = None
    if platform.is_rank0():
        try:
            begin_save(save_dir, iteration)
        except CheckpointError as e:
            error = e
    if not platform.all_agree(error is None):
        raise error or CheckpointError(f"--save {save_dir}: rank 0 could not prepare the checkpoint directory")
    dtype = next((p.dtype for n, p in model.named_parameters() if not n.endswith(LOGITS_SUFFIX)), torch.float32)
    if platform.dp_rank() == 0:  # one replica of each TP rank writes
        try:
            sd = model_state_dict(model)
            payload = shard_payload(sd, cfg, tp=tp_size, rank=tp_rank, iteration=iteration, dtype=dtype,
                                    run_args=run_args)
            payload["opt_param_scheduler"] = scheduler.state_dict()
            payload["train_state"] = dict(train_state)
            if optimizer is not None:
                payload["optimizer"] = optimizer.state_dict()
            if save_rng:
                payload["rng_state"] = [rng_state()]
            write_shard(tmp, tp_rank, payload)
            del payload, sd
        except Exception as e:  # reported on every rank below
            error = e
    if not platform.all_agree(error is None):
        if platform.is_rank0():
            shutil.rmtree(tmp, ignore_errors=True)
        if error is not None:
            raise CheckpointError(f"{tmp}: writing TP rank {tp_rank}'s checkpoint failed ({error})") from error
        raise CheckpointError(f"{tmp}: another rank failed to write its part of iteration {iteration}")
    if platform.is_rank0():
        try:
            commit_save(tmp, cfg, iteration=iteration, tp=tp_size, dtype=dtype, tokenizer_source=tokenizer_source,
                        tokenizer_type=tokenizer_type, extra_info=info_extra, keep_last=keep_last)
        except Exception as e:
            error = e
    if not platform.all_agree(error is None):
        if error is not None:
            raise CheckpointError(f"{final}: committing the checkpoint failed ({error})") from error
        raise CheckpointError(f"{final}: rank 0 failed to commit the checkpoint")
    return final


def load_model_weights(model: torch.nn.Module, sd: Mapping[str, torch.Tensor], *, allow_missing_logits: bool,
                       where: str) -> Dict[str, List[str]]:
    """Copy ``sd`` into ``model``: ``*.hard_mask`` entries are skipped, and mask logits the
    checkpoint lacks keep their initial values when ``allow_missing_logits``.
    Returns ``{"skipped": [...], "fresh": [...]}`` (key names)."""
    own = {k: v for k, v in model.state_dict().items() if not is_extra_state(k)}
    skipped = sorted(k for k in sd if k.endswith(HARD_MASK_SUFFIX))
    wanted = {k: v for k, v in sd.items() if not k.endswith(HARD_MASK_SUFFIX) and not is_extra_state(k)}
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
