"""Export sparse checkpoints (masks baked into the weights) and check N:M sparsity.

``export_sparse(load, save, fmt)`` reads one of our checkpoints that carries, per
masked linear, ``mask_logits`` and/or ``hard_mask`` (``masks.extract_hard_masks``:
argmax of the logits, else the hard mask), and writes

``megatron``  our checkpoint (same TP): weights times their hard mask, one
              ``<layer>.hard_mask`` (bool) per masked linear, no logits;
``hf``        a Hugging Face directory (fp16 unless ``dtype`` says otherwise) with the
              masks baked in, through ``checkpoint.mcore_to_hf``;
``masks``     ``masks.npz``: the hard masks alone, compressed. Each group of ``M`` is
              stored as the index of its candidate (``nm.candidates`` order) in
              ``ceil(log2 C)`` bits, MSB first, all groups of a layer bit-packed
              (``np.packbits``). 2:4 has 6 candidates -> 3 bits per 4 weights = 0.75 bits
              per parameter, against 1 for a plain bitmap. Masks are stored for the
              layers of the TP=1 model (TP-merged), keyed by our layer names.

``check_sparsity(path, N, M)`` verifies every group of ``M`` weights along the input
dimension of every masked linear has at most ``N`` non-zeros, on a Hugging Face
directory (``q/k/v/o_proj``, ``gate/up/down_proj``) or one of our checkpoints
(``linear_qkv/proj/fc1/fc2``, every TP shard).
"""
from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Optional, Sequence

import numpy as np
import torch

from megatron_ext.errors import InputError
from megatron_ext.files import atomic_write
from megatron_ext.checkpoint import (
    load_checkpoint,
    mcore_to_hf,
    merge_tp,
    save_checkpoint,
)
from megatron_ext.checkpoint import (CONFIG_NAME, HARD_MASK_SUFFIX, LOGITS_SUFFIX, MASK_SUFFIXES, load_hf_state_dict,
                                     save_hf_checkpoint)
from megatron_ext.models.spec import LINEAR_PATHS
from megatron_ext.sparsity import nm
from megatron_ext.sparsity.masks import extract_hard_masks

FORMATS = ("hf", "masks", "megatron")
PACKED_FORMAT = "megatron_ext.packed_nm_masks"
PACKED_VERSION = 1
PACKED_FILE = "masks.npz"

MCORE_MASKED = re.compile(r"^decoder\.layers\.(\d+)\.(" + "|".join(map(re.escape, LINEAR_PATHS.values()))
                          + r")\.weight$")
HF_MASKED = re.compile(r"^model\.layers\.(\d+)\.(self_attn\.q_proj|self_attn\.k_proj|self_attn\.v_proj|"
                       r"self_attn\.o_proj|mlp\.gate_proj|mlp\.up_proj|mlp\.down_proj)\.weight$")
_ORDER = (*LINEAR_PATHS.values(), "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
          "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


class ExportError(InputError):
    """Bad input for an export or a check (file, flag, masks); the message names it."""


# --------------------------------------------------------------------------- baking


def bake_masks(state_dict: Mapping[str, torch.Tensor], N: Optional[int] = None,
               M: Optional[int] = None) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(state dict with every masked weight multiplied by its hard mask, one bool
    ``<layer>.hard_mask`` per layer and no logits; ``{layer: mask}``)."""
    masks = extract_hard_masks(state_dict, N, M)
    out = {k: v for k, v in state_dict.items() if not k.endswith(MASK_SUFFIXES)}
    for prefix, mask in masks.items():
        key = prefix + ".weight"
        if key not in out:
            raise ExportError(f"{prefix}: mask without a weight ({key!r} missing)")
        w = out[key]
        out[key] = w * mask.to(w.dtype)
        out[prefix + HARD_MASK_SUFFIX] = mask.to(torch.bool)
    return out, masks


def baked_weights(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``bake_masks``'s state dict alone: what evaluating with the hard masks loads
    (``megatron_ext.evaluation``'s ``apply_masks``)."""
    return bake_masks(state_dict)[0]


# --------------------------------------------------------------------------- packed masks


def _bits_per_group(N: int, M: int) -> int:
    return max(1, math.ceil(math.log2(nm.num_candidates(N, M))))


def _pattern_ids(groups: torch.Tensor) -> torch.Tensor:
    """Bool groups ``[G, M]`` -> their bit pattern as an integer (bit k = position k)."""
    weights = 1 << torch.arange(groups.shape[-1], dtype=torch.int64)
    return (groups.to(torch.int64) * weights).sum(-1)


def encode_mask(mask: torch.Tensor, N: int, M: int, name: str = "mask") -> np.ndarray:
    """Bool ``[out, in]`` exact N:M mask -> packed candidate indices (uint8 array)."""
    nm.check_nm_args(N, M)
    if M > 16:
        raise ExportError(f"packed masks support M <= 16, got M={M}")
    if mask.dim() != 2 or mask.shape[1] % M:
        raise ExportError(f"{name}: mask of shape {tuple(mask.shape)} is not [out, in] with in a multiple of M={M}")
    cands = nm.candidates(N, M).bool()
    lut = torch.full((1 << M,), -1, dtype=torch.int64)
    lut[_pattern_ids(cands)] = torch.arange(cands.shape[0])
    groups = mask.detach().cpu().bool().reshape(-1, M)
    idx = lut[_pattern_ids(groups)]
    bad = (idx < 0).nonzero()
    if bad.numel():
        g = int(bad[0, 0])
        row, col = divmod(g, mask.shape[1] // M)
        raise ExportError(f"{name}: row {row}, group {col} (columns {col * M}-{col * M + M - 1}) keeps "
                          f"{int(groups[g].sum())} of {M}, not exactly N={N}: not an N:M candidate")
    b = _bits_per_group(N, M)
    shifts = torch.arange(b - 1, -1, -1, dtype=torch.int64)
    bits = ((idx[:, None] >> shifts) & 1).to(torch.uint8).numpy()
    return np.packbits(bits.reshape(-1))


def decode_mask(packed: np.ndarray, shape: Sequence[int], N: int, M: int) -> torch.Tensor:
    """Inverse of ``encode_mask``."""
    rows, cols = int(shape[0]), int(shape[1])
    groups = rows * cols // M
    b = _bits_per_group(N, M)
    if packed.dtype != np.uint8 or packed.size * 8 < groups * b:
        raise ExportError(f"packed mask of {packed.size} bytes is too short for shape {tuple(shape)} at {N}:{M}")
    bits = np.unpackbits(packed, count=groups * b).reshape(groups, b).astype(np.int64)
    idx = torch.from_numpy(bits @ (1 << np.arange(b - 1, -1, -1, dtype=np.int64)))
    num = nm.num_candidates(N, M)
    if groups and int(idx.max()) >= num:
        raise ExportError(f"packed mask holds candidate index {int(idx.max())}, but {N}:{M} has {num}")
    return nm.masks_from_choice(idx.reshape(rows, cols // M), nm.candidates(N, M))


@dataclass
class PackStats:
    path: Path
    layers: int
    params: int          # weights covered by the masks
    bytes: int           # packed payload bytes (all layers)
    bits_per_param: float

    def row(self) -> str:
        return (f"| {self.layers} | {self.params} | {self.bytes} | {self.bits_per_param:.4f} |")


def save_packed_masks(path: str | os.PathLike, masks: Mapping[str, torch.Tensor], N: int, M: int,
                      extra: Optional[Mapping] = None) -> PackStats:
    """Write ``masks`` ({layer: bool [out, in]}, exact N:M) as a packed ``.npz`` (atomic)."""
    path = Path(path)
    arrays: dict[str, np.ndarray] = {}
    layers = []
    params = nbytes = 0
    for i, (name, mask) in enumerate(masks.items()):
        packed = encode_mask(mask, N, M, name)
        key = f"layer_{i:05d}"
        arrays[key] = packed
        layers.append({"name": name, "key": key, "shape": [int(s) for s in mask.shape]})
        params += mask.numel()
        nbytes += packed.size
    meta = {"format": PACKED_FORMAT, "version": PACKED_VERSION, "N": N, "M": M,
            "candidates": nm.num_candidates(N, M), "bits_per_group": _bits_per_group(N, M),
            "candidate_order": "itertools.combinations(range(M), N), bits MSB first",
            "layers": layers, **dict(extra or {})}
    arrays["meta"] = np.array(json.dumps(meta))
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda f: np.savez(f, **arrays), durable=True)
    return PackStats(path, len(layers), params, nbytes, 8.0 * nbytes / max(params, 1))


def load_packed_masks(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict]:
    """``({layer: bool [out, in]}, metadata)`` of a file written by ``save_packed_masks``."""
    path = Path(path)
    if path.is_dir():
        path = path / PACKED_FILE
    try:
        data = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise ExportError(f"{path}: packed mask file not found") from None
    except Exception as e:
        raise ExportError(f"{path}: cannot read packed masks ({e})") from None
    with data:
        if "meta" not in data.files:
            raise ExportError(f"{path}: no 'meta' entry (not a packed mask file)")
        meta = json.loads(str(data["meta"]))
        if meta.get("format") != PACKED_FORMAT or meta.get("version") != PACKED_VERSION:
            raise ExportError(f"{path}: format {meta.get('format')!r} version {meta.get('version')!r}, "
                              f"expected {PACKED_FORMAT!r} version {PACKED_VERSION}")
        N, M = int(meta["N"]), int(meta["M"])
        out = {}
        for layer in meta["layers"]:
            if layer["key"] not in data.files:
                raise ExportError(f"{path}: layer {layer['name']!r} has no entry {layer['key']!r}")
            out[layer["name"]] = decode_mask(data[layer["key"]], layer["shape"], N, M)
    return out, meta


# --------------------------------------------------------------------------- export


@dataclass
class ExportResult:
    path: Path
    format: str
    N: int
    M: int
    layers: int
    pack: Optional[PackStats] = None


def _resolve_nm(N: Optional[int], M: Optional[int], extra: Mapping) -> tuple[Optional[int], Optional[int]]:
    recorded = extra.get("sparsity") if isinstance(extra.get("sparsity"), Mapping) else {}
    return (N if N is not None else recorded.get("N"), M if M is not None else recorded.get("M"))


def _nm_from_logits(sd: Mapping[str, torch.Tensor], N: Optional[int], M: Optional[int],
                    where: str) -> tuple[int, int]:
    for key, logits in sd.items():
        if key.endswith(LOGITS_SUFFIX):
            weight = sd.get(key[: -len(LOGITS_SUFFIX)] + ".weight")
            if M is None and weight is not None and logits.dim() == 3 and logits.shape[1]:
                M = int(weight.shape[1] // logits.shape[1])
            if M is not None and N is None:
                try:
                    N = nm.infer_n(int(logits.shape[-1]), M)
                except ValueError as e:
                    raise ExportError(f"{where}: {key}: {e}") from None
            break
    if N is None or M is None:
        raise ExportError(f"{where}: the checkpoint records no N:M sparsity and its masks do not imply one; "
                          "pass --N and --M")
    return N, M


def export_sparse(load: str | os.PathLike, save: str | os.PathLike, fmt: str, *, N: Optional[int] = None,
                  M: Optional[int] = None, dtype: Optional[str] = None, overwrite: bool = False) -> ExportResult:
    """Export the hard masks of checkpoint ``load`` in format ``fmt`` (see the module doc).

    ``N``/``M`` default to what the checkpoint records (``checkpoint.json`` ``sparsity``)
    or what the mask shapes imply. Every mask is checked to be N:M.
    """
    if fmt not in FORMATS:
        raise ExportError(f"--format {fmt!r}: expected one of {', '.join(FORMATS)}")
    save = Path(save)
    if fmt == "masks":
        if save.exists() and not save.is_dir():
            raise ExportError(f"--save {save}: exists and is not a directory")
        if (save / PACKED_FILE).exists() and not overwrite:
            raise ExportError(f"{save / PACKED_FILE}: exists (pass overwrite to replace it)")
    info, sds = load_checkpoint(load)
    cfg = info.config
    if not any(k.endswith(MASK_SUFFIXES) for k in sds[0]):
        raise ExportError(f"{info.iter_dir}: no mask_logits or hard_mask tensors to export")
    N, M = _resolve_nm(N, M, info.extra)
    if N is None or M is None:
        N, M = _nm_from_logits(sds[0], N, M, str(info.iter_dir))
    baked, rank_masks = [], []
    for rank, sd in enumerate(sds):
        try:
            b, masks = bake_masks(sd, N, M)
        except ValueError as e:
            raise ExportError(f"{info.shard_path(rank)}: {e}") from None
        if not masks:
            raise ExportError(f"{info.shard_path(rank)}: no mask_logits or hard_mask tensors to export")
        baked.append(b)
        rank_masks.append(masks)
    expected = [f"decoder.layers.{i}.{name}" for i in range(cfg.num_layers) for name in LINEAR_PATHS.values()]
    for rank, masks in enumerate(rank_masks):
        missing = [p for p in expected if p not in masks]
        if missing:
            raise ExportError(f"{info.shard_path(rank)}: no mask for masked linear {missing[0]!r} "
                              f"({len(missing)} of {len(expected)} missing)")
        for prefix, mask in masks.items():
            if mask.shape[1] % M or not nm.check_nm(mask, N, M):
                raise ExportError(f"{info.shard_path(rank)}: mask of {prefix} is not {N}:{M}")
    sparsity = {**dict(info.extra.get("sparsity") or {}), "N": N, "M": M, "exported_from": os.fspath(load)}
    if fmt == "megatron":
        save_checkpoint(save, baked, cfg, iteration=info.iteration, dtype=dtype, tokenizer_dir=info.tokenizer_dir,
                        tokenizer_type=info.tokenizer_type, extra_info={**info.extra, "sparsity": sparsity},
                        overwrite=overwrite)
        return ExportResult(save, fmt, N, M, len(rank_masks[0]))
    if fmt == "hf":
        hf_sd = mcore_to_hf(baked, cfg)
        save_hf_checkpoint(save, cfg, hf_sd, dtype=dtype or "fp16", tokenizer_dir=info.tokenizer_dir,
                           overwrite=overwrite)
        return ExportResult(save, fmt, N, M, len(rank_masks[0]))
    full = merge_tp(baked, cfg)
    masks = {prefix: full[prefix + HARD_MASK_SUFFIX] for prefix in _sorted_layers(rank_masks[0])}
    stats = save_packed_masks(save / PACKED_FILE, masks, N, M, extra={"config": cfg.to_dict(), "source": os.fspath(load)})
    return ExportResult(save, fmt, N, M, len(masks), stats)


# --------------------------------------------------------------------------- checking


def _layer_key(name: str) -> tuple:
    m = re.search(r"layers\.(\d+)\.(.+?)(?:\.weight|" + re.escape(HARD_MASK_SUFFIX) + r")?$", name)
    if not m:
        return (1 << 30, name)
    sub = m.group(2)
    return (int(m.group(1)), _ORDER.index(sub) if sub in _ORDER else len(_ORDER), name)


def _sorted_layers(names) -> list[str]:
    return sorted(names, key=_layer_key)


@dataclass
class LayerSparsity:
    name: str
    params: int = 0
    zeros: int = 0
    max_group_nonzeros: int = 0
    bad_groups: int = 0

    @property
    def sparsity(self) -> float:
        return self.zeros / self.params if self.params else 0.0

    def line(self, N: int) -> str:
        status = "ok" if self.bad_groups == 0 else f"FAIL ({self.bad_groups} groups with more than {N} non-zeros)"
        return (f"{self.name:60s} sparsity {self.sparsity:.4f}  max non-zeros/group "
                f"{self.max_group_nonzeros}  {status}")


@dataclass
class SparsityReport:
    path: Path
    source: str          # "hf" | "megatron"
    N: int
    M: int
    layers: list[LayerSparsity] = field(default_factory=list)
    first_violation: Optional[str] = None

    @property
    def ok(self) -> bool:
        return bool(self.layers) and self.first_violation is None

    @property
    def sparsity(self) -> float:
        params = sum(l.params for l in self.layers)
        return sum(l.zeros for l in self.layers) / params if params else 0.0


def _check_tensor(layer: LayerSparsity, name: str, w: torch.Tensor, N: int, M: int, where: str) -> Optional[str]:
    if w.dim() != 2:
        raise ExportError(f"{where}: tensor {name!r} has shape {tuple(w.shape)}, expected [out, in]")
    if w.shape[1] % M:
        return f"{name}{where}: input dimension {w.shape[1]} is not a multiple of M={M}"
    counts = (nm.group_view(w, M) != 0).sum(-1)
    layer.params += w.numel()
    layer.zeros += int((w == 0).sum())
    layer.max_group_nonzeros = max(layer.max_group_nonzeros, int(counts.max()) if counts.numel() else 0)
    bad = (counts > N).nonzero()
    layer.bad_groups += bad.shape[0]
    if bad.shape[0]:
        row, g = int(bad[0, 0]), int(bad[0, 1])
        return (f"{name}{where}: row {row}, group {g} (input columns {g * M}-{g * M + M - 1}) has "
                f"{int(counts[row, g])} non-zeros, more than N={N} of M={M}")
    return None


def check_sparsity(path: str | os.PathLike, N: int, M: int) -> SparsityReport:
    """Per-layer sparsity of every masked linear and the first group breaking N:M."""
    try:
        nm.check_nm_args(N, M)
    except ValueError as e:
        raise ExportError(f"--N/--M: {e}") from None
    path = Path(path)
    if not path.exists():
        raise ExportError(f"{path}: no such checkpoint or Hugging Face directory")
    if (path / CONFIG_NAME).is_file():
        report = SparsityReport(path, "hf", N, M)
        sd = load_hf_state_dict(path)
        names = _sorted_layers(k for k in sd if HF_MASKED.match(k))
        for name in names:
            layer = LayerSparsity(name)
            found = _check_tensor(layer, name, sd[name], N, M, "")
            report.first_violation = report.first_violation or found
            report.layers.append(layer)
    else:
        info, sds = load_checkpoint(path)
        report = SparsityReport(path, "megatron", N, M)
        names = _sorted_layers(k for k in sds[0] if MCORE_MASKED.match(k))
        tp = len(sds)
        for name in names:
            layer = LayerSparsity(name)
            for rank, sd in enumerate(sds):
                where = f" (TP rank {rank} of {tp})" if tp > 1 else ""
                found = _check_tensor(layer, name, sd[name], N, M, where)
                report.first_violation = report.first_violation or found
            report.layers.append(layer)
    if not report.layers:
        raise ExportError(f"{path}: no masked linear weights found")
    return report
