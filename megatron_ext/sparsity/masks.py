"""Hard N:M masks out of state dicts and checkpoints, and MaskLLM prior injection.

A checkpoint may carry, per masked linear, ``<layer>.mask_logits`` (learned,
``[out, in / M, C]``) and/or ``<layer>.hard_mask`` (``[out, in]``, uint8/bool: a
one-shot or exported mask). The hard mask of a layer is the argmax candidate of its
logits, else its ``hard_mask``.
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Dict, Mapping, Optional, Union

import torch

from megatron_ext.checkpoint import HARD_MASK_SUFFIX, LOGITS_SUFFIX, MASK_SUFFIXES
from megatron_ext.sparsity.nm import candidates, infer_n, masks_from_choice


def _layer_nm(prefix: str, logits: torch.Tensor, state_dict: Mapping[str, torch.Tensor],
              N: Optional[int], M: Optional[int]) -> tuple[int, int]:
    groups, num_cands = logits.shape[1], logits.shape[2]
    weight = state_dict.get(prefix + ".weight")
    if M is None:
        if weight is None:
            raise ValueError(f"{prefix}{LOGITS_SUFFIX}: no {prefix}.weight to infer M from; pass M")
        if weight.dim() != 2 or weight.shape[0] != logits.shape[0] or weight.shape[1] % groups:
            raise ValueError(f"{prefix}: weight {tuple(weight.shape)} does not fit mask logits {tuple(logits.shape)}")
        M = weight.shape[1] // groups
    if N is None:
        try:
            N = infer_n(num_cands, M)
        except ValueError as e:
            raise ValueError(f"{prefix}{LOGITS_SUFFIX}: {e}") from None
    if math.comb(M, N) != num_cands:
        raise ValueError(f"{prefix}{LOGITS_SUFFIX}: {num_cands} candidates per group, but {N}:{M} has "
                         f"{math.comb(M, N)}")
    return N, M


def extract_hard_masks(state_dict: Mapping[str, torch.Tensor], N: Optional[int] = None,
                       M: Optional[int] = None) -> Dict[str, torch.Tensor]:
    """``{layer prefix: bool [out, in]}`` for every layer with mask logits or a hard mask.

    ``M`` defaults to what the layer's weight and logits shapes imply and ``N`` to
    the one pattern with that many candidates (pass ``N`` when two fit, e.g. 1:4 and 3:4).
    """
    prefixes = sorted({k[: -len(suffix)] for k in state_dict for suffix in MASK_SUFFIXES
                       if k.endswith(suffix)})
    out: Dict[str, torch.Tensor] = {}
    for prefix in prefixes:
        logits = state_dict.get(prefix + LOGITS_SUFFIX)
        if logits is not None:
            if logits.dim() != 3:
                raise ValueError(f"{prefix}{LOGITS_SUFFIX}: expected [out, in / M, C], got shape {tuple(logits.shape)}")
            n, m = _layer_nm(prefix, logits, state_dict, N, M)
            mask = masks_from_choice(logits.argmax(dim=-1), candidates(n, m))
        else:
            hard = state_dict[prefix + HARD_MASK_SUFFIX]
            if hard.dim() != 2:
                raise ValueError(f"{prefix}{HARD_MASK_SUFFIX}: expected [out, in], got shape {tuple(hard.shape)}")
            mask = hard != 0
        weight = state_dict.get(prefix + ".weight")
        if weight is not None and tuple(weight.shape) != tuple(mask.shape):
            raise ValueError(f"{prefix}: mask shape {tuple(mask.shape)} differs from weight {tuple(weight.shape)}")
        out[prefix] = mask
    return out


def model_hard_masks(model: torch.nn.Module) -> Dict[str, torch.Tensor]:
    """``{layer name: bool [out_local, in_local]}`` argmax masks of a sparse model's layers."""
    from megatron_ext.sparsity.model import masked_linears

    return {layer.layer_name or name: layer.hard_mask() for name, layer in masked_linears(model)}


def load_prior_masks(source: Union[str, os.PathLike, Mapping[str, torch.Tensor]], N: Optional[int] = None,
                     M: Optional[int] = None) -> Dict[str, torch.Tensor]:
    """Hard masks for this tensor-parallel rank, from a state dict of this rank, a
    checkpoint directory (resharded to the current TP size when saved at another),
    or a ``.pt`` file holding a state dict (or ``{"model": state dict}``)."""
    if isinstance(source, Mapping):
        sd = source
    else:
        path = Path(source)
        if path.is_dir():
            from megatron_ext.checkpoint import load_rank_state_dict

            from megatron_ext import platform

            tp, rank = platform.tp_size(), platform.tp_rank()
            _, sd = load_rank_state_dict(path, tp, rank)
        elif path.is_file():
            try:
                payload = torch.load(path, map_location="cpu", weights_only=True)
            except Exception as e:
                raise ValueError(f"{path}: cannot read prior masks with torch.load(weights_only=True) ({e})") from None
            sd = payload.get("model", payload) if isinstance(payload, dict) else None
            if not isinstance(sd, Mapping):
                raise ValueError(f"{path}: no state dict in file")
        else:
            raise FileNotFoundError(f"prior masks: no such checkpoint directory or file: {path}")
    masks = extract_hard_masks(sd, N, M)
    if not masks:
        where = "state dict" if isinstance(source, Mapping) else str(source)
        raise ValueError(f"{where}: no mask_logits or hard_mask tensors to take prior masks from")
    return masks


def apply_prior(model: torch.nn.Module, masks: Mapping[str, torch.Tensor], alpha: float) -> int:
    """Inject ``masks`` into every masked linear's logits with strength ``alpha``
    (``--prior-strength``); every layer needs a mask and every mask a layer.
    A collective on each layer's TP group: all ranks call it. Returns the layer count."""
    from megatron_ext.sparsity.model import masked_linears

    if not alpha >= 0:
        raise ValueError(f"--prior-strength must be >= 0, got {alpha}")
    layers = [(layer.layer_name or name, layer) for name, layer in masked_linears(model)]
    names = {n for n, _ in layers}
    missing = sorted(names - set(masks))
    extra = sorted(set(masks) - names)
    if missing:
        raise ValueError(f"prior masks lack layer {missing[0]!r} ({len(missing)} of {len(names)} missing)")
    if extra:
        raise ValueError(f"prior masks name layer {extra[0]!r} the model does not have ({len(extra)} unknown)")
    for name, layer in layers:
        layer.set_prior(masks[name], alpha)
    return len(layers)
